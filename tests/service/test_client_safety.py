"""Client side: ids cannot escape their URL path segment."""

from __future__ import annotations

import pytest

from advface.service.sdk import InvalidRequestError, NotFoundError

from .conftest import Harness, assert_error, feature_map, sdk_client


def test_sdk_encodes_ids_so_paths_cannot_reach_another_subject(harness: Harness) -> None:
    harness.subject("victim")
    assert harness.enroll("victim", feature_map(1)).status_code == 201
    before = harness.state()
    c = sdk_client(harness)
    with pytest.raises((NotFoundError, InvalidRequestError)):
        c.verify("nobody/../victim", feature_map(1))
    with pytest.raises((NotFoundError, InvalidRequestError)):
        c.enroll("nobody/../victim", feature_map(2))
    with pytest.raises((NotFoundError, InvalidRequestError)):
        c.delete_subject("ghost/../victim")
    for dots in (".", ".."):
        with pytest.raises(InvalidRequestError) as e:
            c.delete_subject(dots)
        assert e.value.code == "invalid_subject_id"
    assert harness.state() == before
    assert [s.templates for s in c.list_subjects()] == [1]


def test_subject_ids_are_nfc_normalised(harness: Harness) -> None:
    composed, decomposed = "zo\u00eb", "zoe\u0308"
    harness.subject(composed)
    assert_error(
        harness.client.post("/v1/subjects", json={"subject_id": decomposed}, headers=harness.h()),
        409,
        "subject_exists",
    )
    c = sdk_client(harness)
    assert c.enroll(decomposed, feature_map(3)).subject_id == composed
    assert c.verify(decomposed, feature_map(3)).match
    assert [(s.subject_id, s.templates) for s in c.list_subjects()] == [(composed, 1)]
    assert c.delete_subject(decomposed) == 1
    assert harness.state() == (0, 0)
