"""``GET /metrics``: requests counted by route template (never an id), refusals included,
the protection's and Psi's compute times, and the switch that turns it off."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from advface.service import payload
from advface.service.backend import Backend

from .conftest import Harness, assert_error, feature_map, make_harness


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _requests(samples: dict, route: str, method: str, status: str) -> float:
    labels = (("method", method), ("route", route), ("status", status))
    return samples.get(("advface_http_requests_total", labels), 0.0)


@pytest.fixture
def harness(db_url: str, toy: Backend) -> Iterator[Harness]:
    h, cm = make_harness(db_url, toy, metrics=1)
    try:
        yield h
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_metrics_count_by_route_template_with_refusals_and_no_ids(harness: Harness) -> None:
    sid = "alice@example.com"
    harness.subject(sid)
    for i in range(2):
        assert harness.enroll(sid, feature_map(1, 0.1, i)).status_code == 201
    assert harness.verify(sid, feature_map(1, 0.1, 5)).status_code == 200
    c = harness.client
    assert c.get("/v1/subjects", headers={"X-API-Key": "afk_000000000000_x"}).status_code == 401
    assert c.get("/no/such/secret-path").status_code == 404
    assert c.request("BREW", "/health").status_code == 405
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert sid not in r.text and "secret-path" not in r.text and "BREW" not in r.text
    s = _samples(r.text)
    assert _requests(s, "/v1/subjects", "POST", "201") == 1
    assert _requests(s, "/v1/subjects/{subject_id}/templates", "POST", "201") == 2
    assert _requests(s, "/v1/subjects/{subject_id}/verify", "POST", "200") == 1
    assert _requests(s, "/v1/subjects", "GET", "401") == 1  # refused by the guard, counted
    assert _requests(s, "other", "GET", "404") == 1
    assert _requests(s, "/health", "other", "405") == 1
    # Two enrolments protect twice; Psi ran for them and the probe.
    assert s[("advface_protection_seconds_count", ())] == 2
    assert s[("advface_psi_seconds_count", ())] == 3
    latency = ("advface_http_request_duration_seconds_count",
               (("method", "POST"), ("route", "/v1/subjects/{subject_id}/templates")))  # fmt: skip
    assert s[latency] == 2
    assert s[("advface_ready", ())] == 1
    decided = ("advface_decisions_total", (("kind", "verify"), ("match", "true")))
    assert s[decided] == 1  # the genuine probe above
    assert c.post("/v1/identify", content=payload.encode(feature_map(9)), headers=harness.h())
    s = _samples(c.get("/metrics").text)
    assert (
        sum(
            v
            for (n, labels), v in s.items()
            if n == "advface_decisions_total" and ("kind", "identify") in labels
        )
        == 1
    )
    info = [k for k in s if k[0] == "advface_build_info"]
    assert len(info) == 1 and dict(info[0][1])["protection"] == "none"


def test_metrics_are_off_by_default(db_url: str, toy: Backend) -> None:
    h, cm = make_harness(db_url, toy)
    try:
        assert h.client.get("/metrics").status_code == 404
        assert h.service.metrics is None
        h.subject("bob")  # the service works without them
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_a_metrics_token_is_required_when_set(db_url: str, toy: Backend) -> None:
    h, cm = make_harness(db_url, toy, metrics=1, metrics_token="s3cret-token")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            assert_error(h.client.get("/metrics", headers=headers), 401, "invalid_metrics_token")
        ok = h.client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and "advface_http_requests_total" in ok.text
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_two_apps_in_one_process_keep_their_own_counts(db_url: str, toy: Backend) -> None:
    """Each app has its own registry (no duplicate-metric error, no shared counts)."""
    apps: list[tuple[Harness, Any]] = [make_harness(db_url, toy, metrics=1) for _ in range(2)]
    try:
        apps[0][0].client.get("/health")
        counts = [
            _requests(_samples(h.client.get("/metrics").text), "/health", "GET", "200")
            for h, _ in apps
        ]
        assert counts == [1, 0]
    finally:
        for h, cm in apps:
            cm.__exit__(None, None, None)
            h.store.close()
