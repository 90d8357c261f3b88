import json

import pytest

from advface.pipelines.reproduce import paper
from advface.pipelines.reproduce.headline import headline_table
from advface.pipelines.reproduce.profiles import PROFILES, get_profile
from advface.pipelines.reproduce.report import ROW_KEYS, make_row, render_markdown
from advface.pipelines.reproduce.stages import StageCache, settings_key


def test_make_row_has_every_key_and_rejects_unknown():
    row = make_row("table1", "lfw", "none", ssim=0.5, extra={"n_images": 3})
    assert set(ROW_KEYS) <= set(row) and row["n_images"] == 3 and row["accuracy"] is None
    with pytest.raises(ValueError):
        make_row("table1", "lfw", "none", bogus=1)


def test_report_flags_deviations_beyond_tolerance():
    rows = [
        make_row("table1", "lfw", "advface", ssim=0.28, psnr=6.97, mse=0.206, srra=0.5),
        make_row("table2", "lfw", "none", accuracy=0.9813),
    ]
    meta = {"profile": get_profile("smoke").to_dict(), "device": "cpu", "wall_s": 1.0}
    md = render_markdown(meta, rows)
    assert "table1 advface lfw srra" in md  # 50% vs 4.03%: flagged
    assert "table1 advface lfw ssim" not in md  # equal to the paper: not flagged
    assert "no offline copy" in md
    assert "| none |" in md and headline_table(rows).count("\n") == 1


def test_stage_cache_reuses_results(tmp_path):
    cache = StageCache(tmp_path)
    calls = []
    value = cache.json("x", {"a": 1}, lambda: calls.append(1) or {"v": 2})
    again = cache.json("x", {"a": 1}, lambda: calls.append(1) or {"v": 3})
    assert value == again == {"v": 2} and len(calls) == 1
    assert settings_key({"a": 1}) != settings_key({"a": 2})


def test_profiles_and_paper_tables_are_consistent():
    assert set(PROFILES) == {"smoke", "cpu", "paper"}
    with pytest.raises(ValueError):
        get_profile("huge")
    for shadow, attacker in paper.TABLE4:
        assert shadow in PROFILES["paper"].archs and attacker in PROFILES["paper"].archs


@pytest.mark.data
def test_smoke_profile_end_to_end_and_resumes(data_root, tmp_path):
    from advface.pipelines.reproduce.run import reproduce

    out = tmp_path / "smoke"
    res = reproduce(get_profile("smoke"), out, progress=False)
    data = json.loads((out / "results.json").read_text())
    tables = {r["table"] for r in data["rows"]}
    assert {"table1", "table2", "table3", "table4", "fig4", "adaptive", "readings"} <= tables
    for r in data["rows"]:
        assert set(ROW_KEYS) <= set(r)
        for k in ("accuracy", "srra"):
            assert r[k] is None or 0.0 <= r[k] <= 1.0
    assert (out / "report.md").read_text().startswith("# AdvFace reproduction")
    assert (out / "table1.csv").exists() and list(out.glob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()}
    again = reproduce(get_profile("smoke"), out, progress=False)
    assert again["rows"] == res["rows"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # every stage reused
    # Stages are keyed by what they depend on: a changed note or sweep recomputes nothing old.
    reproduce(get_profile("smoke", notes=("other note",), sweep=(0.2,)), out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p for p in (out / "cache").rglob("*") if p.is_file()} == set(stamps)


def test_memo_features_protects_each_map_once():
    import torch

    from advface.attacks.train import MemoFeatures

    calls: list[int] = []

    def fn(z: torch.Tensor) -> torch.Tensor:
        calls.append(len(z))
        return z + 1

    memo = MemoFeatures(fn)
    z = torch.randn(4, 2, 3, 3)
    first = memo(z)
    again = memo(z[[2, 0]])
    assert calls == [4]  # the second call found every map
    assert torch.allclose(first, z + 1, atol=1e-2) and torch.equal(again, first[[2, 0]])
    memo(torch.cat([z[:1], z[:1] + 5]))
    assert calls == [4, 1]
