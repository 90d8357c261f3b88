"""The scripts in examples/ run as documented (on real faces; the networks are tiny and
untrained, so only the flow and the invariants are checked, not the privacy figures)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.data
def test_protect_and_attack(data_root: Path, tmp_path: Path, one_thread: None) -> None:
    from advface.models.recon import build_recon, save_checkpoint

    cfg = {"blocks": 1, "width": 4}
    for name in ("shadow", "attacker"):
        save_checkpoint(tmp_path / name, build_recon("resrec", **cfg), "resrec", cfg)
    grid = tmp_path / "grid.png"
    folder = data_root / "lfw" / "lfw-deepfunneled" / "Aaron_Peirsol"
    images = [str(folder / f"Aaron_Peirsol_{i:04d}.jpg") for i in (1, 2)]
    main = runpy.run_path(str(EXAMPLES / "protect_and_attack.py"))["main"]
    out = main(
        [*images, "--shadow", str(tmp_path / "shadow"), "--attacker", str(tmp_path / "attacker"),
         "--steps", "2", "--grid", str(grid)]
    )  # fmt: skip
    assert out["protection"]["steps"] == 2
    assert len(out["relative_change"]) == 2 and all(d > 0 for d in out["relative_change"])
    assert all(-1.0 <= c <= 1.0 for c in out["cosine_clean_vs_stored"])
    assert set(out["attack_clean"]) == {"ssim", "psnr", "mse"} and "attack_stored" in out
    assert grid.stat().st_size > 0
