"""Print what a ledger (scripts/ledger.sh) or a run's stage cache holds as a Markdown table: each
trained network with its epochs, training time and last loss, whether it is finished, and the
finished settings. (Offline heads appear in a cache only: the ledger leaves them out.)

    python scripts/ledger_status.py docs/results/cpu-full/ledger
    python scripts/ledger_status.py runs/cpu-full/cache
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _network_row(folder: Path, prefix: str) -> str:
    """A decoder (``model-*``: config with ``history`` of L1 per epoch) or a distilled head
    (``offline-*``: config with a training ``record``, loss = the protected-feature loss)."""
    config_path = folder / "config.json"
    name = prefix + folder.name.rsplit("-", 1)[0]
    if not config_path.is_file():
        return f"| {name} | (no config.json) | | | | |"
    config = json.loads(config_path.read_text())
    if "record" in config:  # a finished offline head
        rec = config["record"]
        history, images = rec.get("history", []), rec.get("images", "")
        seconds, done = rec.get("budget_seconds", 0.0), True
        loss = history[-1].get("protected") if history else None
    else:
        history, images = config.get("history", []), config.get("n_train", "")
        seconds = sum(h.get("budget_seconds", h.get("seconds", 0.0)) for h in history)
        loss, done = (history[-1].get("l1") if history else None), bool(config.get("done"))
    loss_text = "" if loss is None else f"{loss:.4f}"
    yes = "yes" if done else "no"
    return f"| {name} | {images} | {len(history)} | {seconds / 60:.1f} | {loss_text} | {yes} |"


def _is_network(path: Path) -> bool:
    """A network's folder (not a distillation's work folder or one being written)."""
    skip = path.name.endswith(".work") or ".tmp" in path.name
    return path.is_dir() and path.name.startswith(("model-", "offline-")) and not skip


def main(ledger: Path) -> int:
    if not ledger.is_dir():
        print(f"no ledger folder {ledger}", file=sys.stderr)
        return 1
    print("| network | training images | epochs | training minutes | last loss | done |")
    print("| --- | --- | --- | --- | --- | --- |")
    for sub in (ledger, ledger / "robustness"):
        if not sub.is_dir():
            continue
        prefix = "" if sub == ledger else "bench: "
        for folder in sorted(p for p in sub.iterdir() if _is_network(p)):
            print(_network_row(folder, prefix))
    records = sorted(p.name for p in ledger.glob("record-*.json"))
    print(f"\n{len(records)} finished protection settings" + (":" if records else "."))
    for name in records:
        print(f"- {name}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} LEDGER", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
