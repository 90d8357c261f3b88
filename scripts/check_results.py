"""Check a reproduction's output folder against what its results must show before they are
published: the run complete, accuracy on the full protocols, the offline rows, attackers that
never saw a test person, and an explanation for every cell the report flags against the paper.

    python scripts/check_results.py runs/cpu-full --full
    python scripts/check_results.py docs/results/cpu          # a subset run: no --full

Prints one line per check and exits 1 if any fails (stdlib only: runs anywhere).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

#: Pairs of the full verification protocols.
FULL_PAIRS = {"lfw": 6000, "cfp-fp": 7000, "cfp-ff": 7000}
FLAGGED = re.compile(r"^- [⚑≈Δ] ")


def _complete(res: dict) -> list[str] | None:
    """None: not recorded (results written before runs recorded it)."""
    if "complete" not in res:
        return None
    return [] if res["complete"] else [f"parts pending: {res.get('parts_pending')}"]


def _protocols(res: dict) -> list[str]:
    bad = []
    for r in res["rows"]:
        if r.get("n_pairs") is None:
            continue
        want = FULL_PAIRS.get(r["dataset"])
        if not r.get("full_protocol") or r["n_pairs"] != want:
            where = f"{r['table']} {r['dataset']} {r['method']} {r.get('mode', '')}".rstrip()
            bad.append(f"{where}: n_pairs {r['n_pairs']} (full protocol: {want})")
    return bad


def _offline(res: dict) -> list[str]:
    profile = res["profile"]
    rows = [r for r in res["rows"] if r["table"] == "table2" and r.get("mode") == "offline"]
    have = {(r["dataset"], r["method"]) for r in rows}
    return [
        f"no offline row for {m} on {d}"
        for d in profile.get("datasets", [])
        for m in profile.get("offline", [])
        if (d, m) not in have
    ]


def _identity(res: dict) -> list[str]:
    bad = []
    for role, rec in res.get("training", {}).items():
        if not role.startswith(("attacker-", "adaptive-")):
            continue
        check = rec.get("identity_check") or {}
        if check.get("overlap") != 0 or not check.get("checked_by_name"):
            bad.append(f"{role}: identity check {check or 'missing'}")
    return bad


def _explanations(report: Path) -> list[str]:
    if not report.is_file():
        return [f"{report} is missing"]
    bad = []
    for line in report.read_text().splitlines():
        if FLAGGED.match(line) and not re.search(r"Why: \S", line):
            bad.append(f"flagged without an explanation: {line[:90]}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a reproduction's output (results.json, report.md)")
    ap.add_argument("--full", action="store_true", help="require the full protocols everywhere")
    args = ap.parse_args(argv)
    path = args.folder / "results.json"
    if not path.is_file():
        print(f"{path} is missing", file=sys.stderr)
        return 2
    res = json.loads(path.read_text())
    checks = {
        "complete": _complete(res),
        "offline rows": _offline(res),
        "attackers identity-disjoint (by name)": _identity(res),
        "every flagged cell explained": _explanations(args.folder / "report.md"),
    }
    if args.full:
        checks["full protocols"] = _protocols(res)
    failed = 0
    for name, problems in checks.items():
        if problems is None:
            print(f"not recorded: {name}")
            continue
        print(f"{'FAIL' if problems else 'ok'}: {name}")
        for p in problems[:20]:
            print(f"    {p}")
        if len(problems) > 20:
            print(f"    ... and {len(problems) - 20} more")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
