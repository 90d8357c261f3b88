"""scripts/check_results.py: what a reproduction must show before it is published."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_results.py"


def _results(**over) -> dict:
    rows = [
        {"table": "table2", "dataset": "lfw", "method": "none", "mode": "online",
         "n_pairs": 6000, "full_protocol": True},
        {"table": "table2", "dataset": "lfw", "method": "advface", "mode": "offline",
         "n_pairs": 6000, "full_protocol": True},
        {"table": "table1", "dataset": "lfw", "method": "none", "ssim": 0.9},
    ]  # fmt: skip
    check = {"overlap": 0, "checked_by_name": True}
    res = {
        "complete": True,
        "profile": {"datasets": ["lfw"], "offline": ["advface"]},
        "training": {"attacker-resrec": {"identity_check": check}, "shadow-resrec": {}},
        "rows": rows,
    }
    res.update(over)
    return res


def _check(tmp_path: Path, res: dict, report: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "results.json").write_text(json.dumps(res))
    (tmp_path / "report.md").write_text(report)
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


GOOD_REPORT = "# report\n- ⚑ table1 none lfw ssim: 0.90 vs paper 0.93. Why: the attacker's.\n"


def test_a_run_that_shows_everything_passes(tmp_path: Path) -> None:
    r = _check(tmp_path, _results(), GOOD_REPORT, "--full")
    assert r.returncode == 0, r.stdout
    assert r.stdout.count("ok: ") == 5


def test_each_gap_is_named(tmp_path: Path) -> None:
    res = _results(complete=False, parts_pending=["cfp-fp"])
    res["rows"][1].update(mode="online")  # the offline row is missing
    res["rows"][0].update(n_pairs=200, full_protocol=False)
    res["training"]["attacker-resrec"]["identity_check"] = {"overlap": 3, "checked_by_name": True}
    report = "- ⚑ table1 none lfw ssim: 0.90 vs paper 0.93. Why: \n"
    r = _check(tmp_path, res, report, "--full")
    assert r.returncode == 1
    for expected in (
        "FAIL: complete",
        "parts pending: ['cfp-fp']",
        "no offline row for advface on lfw",
        "attacker-resrec: identity check",
        "flagged without an explanation",
        "n_pairs 200 (full protocol: 6000)",
    ):
        assert expected in r.stdout, (expected, r.stdout)
    # Without --full a subset run is accepted (it says so in its report).
    assert "full protocols" not in _check(tmp_path, res, report).stdout
