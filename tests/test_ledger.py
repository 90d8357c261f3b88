"""scripts/ledger.sh: carrying networks and setting records between stage caches; and
scripts/publish.sh: a finished run's results into the committed folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ledger.sh"


def _ledger(*args: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=False
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_export_carries_networks_and_records_only(tmp_path: Path) -> None:
    cache, ledger = tmp_path / "cache", tmp_path / "ledger"
    _write(cache / "model-attacker-resrec-abc" / "config.json", "epoch 3")
    _write(cache / "model-attacker-resrec-abc" / "model.safetensors", "w3")
    _write(cache / "offline-advface-def" / "config.json", "head")
    _write(cache / "offline-dp-ghi.work" / "features" / "0000.safetensors", "large")
    _write(cache / "record-lfw-none-123.json", "{}")
    _write(cache / "record-lfw-dp-456.json.tmp", "half")  # being written
    _write(cache / "stored-lfw-dp-0000-789.safetensors", "chunk")
    r = _ledger("export", cache, ledger)
    assert r.returncode == 0, r.stderr
    assert _files(ledger) == [
        "model-attacker-resrec-abc/config.json",
        "model-attacker-resrec-abc/model.safetensors",
        "offline-advface-def/config.json",
        "record-lfw-none-123.json",
    ]
    # A later export replaces an entry whole (training went on).
    _write(cache / "model-attacker-resrec-abc" / "config.json", "epoch 5")
    assert _ledger("export", cache, ledger).returncode == 0
    assert (ledger / "model-attacker-resrec-abc" / "config.json").read_text() == "epoch 5"
    assert not list(ledger.glob(".*"))  # no temporary left


def test_import_adds_missing_entries_and_keeps_the_caches_own(tmp_path: Path) -> None:
    ledger, cache = tmp_path / "ledger", tmp_path / "cache"
    _write(ledger / "model-shadow-urec-1" / "config.json", "ledger epoch 2")
    _write(ledger / "record-cfp-fp-random-2.json", "ledger")
    _write(cache / "model-shadow-urec-1" / "config.json", "cache epoch 4")
    r = _ledger("import", ledger, cache)
    assert r.returncode == 0 and "1 entries" in r.stdout
    assert (cache / "model-shadow-urec-1" / "config.json").read_text() == "cache epoch 4"
    assert (cache / "record-cfp-fp-random-2.json").read_text() == "ledger"


def test_export_leaves_out_entries_over_the_size_limit(tmp_path: Path) -> None:
    cache, ledger = tmp_path / "cache", tmp_path / "ledger"
    _write(cache / "model-attacker-resrec-abc" / "model.safetensors", "w" * 1000)
    _write(cache / "offline-advface-def" / "model.safetensors", "w" * 300_000)
    r = subprocess.run(
        ["bash", str(SCRIPT), "export", str(cache), str(ledger)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LEDGER_MAX_KB": "100"},
    )
    assert r.returncode == 0, r.stderr
    assert "not carried: offline-advface-def" in r.stderr
    assert [p.name for p in ledger.iterdir()] == ["model-attacker-resrec-abc"]


@pytest.mark.parametrize("args", [(), ("copy", "a", "b"), ("import", "missing-folder", "b")])
def test_bad_use_is_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    r = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert r.returncode in (1, 2) and r.stderr
    assert not (tmp_path / "b").exists()


PUBLISH = SCRIPT.with_name("publish.sh")


def _publish(*args: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(PUBLISH), *map(str, args)], capture_output=True, text=True, check=False
    )


def test_publish_copies_results_without_caches_or_logs(tmp_path: Path) -> None:
    run, dest = tmp_path / "run", tmp_path / "dest"
    _write(run / "results.json", '{"complete": true}')
    _write(run / "table1.csv", "a,b")
    _write(run / "robustness" / "report.md", "bench")
    _write(run / "cache" / "record-lfw-none-1.json", "{}")
    _write(run / "robustness" / "cache" / "model-x" / "config.json", "{}")
    _write(run / "log.txt", "log")
    _write(run / "helper.log", "log")
    _write(run / "report.md.tmp", "half")
    _write(dest / "README.md", "kept")
    _write(dest / "ledger" / "record-lfw-none-1.json", "{}")
    r = _publish(run, dest)
    assert r.returncode == 0, r.stderr
    assert _files(dest) == [
        "README.md",
        "ledger/record-lfw-none-1.json",
        "results.json",
        "robustness/report.md",
        "table1.csv",
    ]


def test_publish_refuses_an_unfinished_run(tmp_path: Path) -> None:
    run, dest = tmp_path / "run", tmp_path / "dest"
    _write(run / "results.json", '{"complete": false, "parts_pending": ["cfp-fp"]}')
    r = _publish(run, dest)
    assert r.returncode == 1 and "not complete" in r.stderr
    assert not dest.exists()
    assert _publish(tmp_path / "nothing", dest).returncode == 1


def test_ledger_status_lists_networks_and_records(tmp_path: Path) -> None:
    import json

    ledger = tmp_path / "ledger"
    history = [{"epoch": 1, "l1": 0.05, "budget_seconds": 600.0}, {"epoch": 2, "l1": 0.03}]
    decoder = {"history": history, "n_train": 6797, "done": True}
    _write(ledger / "model-attacker-resrec-abc" / "config.json", json.dumps(decoder))
    head = {"record": {"history": [{"protected": 0.2, "images": 9}], "budget_seconds": 120.0}}
    _write(ledger / "offline-advface-def" / "config.json", json.dumps(head))
    _write(ledger / "offline-dp-ghi.work" / "state.json", "{}")
    _write(ledger / "robustness" / "model-shadow-urec-1" / "config.json", '{"history": []}')
    _write(ledger / "record-lfw-none-1.json", "{}")
    script = SCRIPT.with_name("ledger_status.py")
    r = subprocess.run(
        ["python3", str(script), str(ledger)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [
        "| model-attacker-resrec | 6797 | 2 | 10.0 | 0.0300 | yes |",
        "| offline-advface |  | 1 | 2.0 | 0.2000 | yes |",
        "| bench: model-shadow-urec |  | 0 | 0.0 |  | no |",
    ]
    assert "1 finished protection settings:\n- record-lfw-none-1.json" in r.stdout
