import json

import pytest

from advface.pipelines.robustness import PROFILES, get_profile
from advface.pipelines.robustness.models import code_fingerprint
from advface.pipelines.robustness.report import render, strongest, summary
from advface.pipelines.robustness.run import METHODS, ORDER


def test_profiles_and_order():
    assert set(PROFILES) == {"smoke", "cpu", "gpu"}
    assert sorted(ORDER) == sorted(METHODS)
    assert get_profile("cpu", test_n=7).test_n == 7
    with pytest.raises(ValueError, match="unknown bench profile"):
        get_profile("huge")


def test_code_fingerprint_follows_the_sources(tmp_path, monkeypatch):
    a = code_fingerprint(("protection",))
    assert a == code_fingerprint(("protection",))
    assert a != code_fingerprint(("attacks/train.py",))
    # The bench's stages hash its computing modules, not its report (wording recomputes nothing).
    from advface.pipelines.robustness.models import EVAL_CODE

    assert "pipelines/robustness/run.py" in EVAL_CODE and "protection" in EVAL_CODE
    assert not any(part.endswith("report.py") for part in EVAL_CODE)
    assert len(code_fingerprint(EVAL_CODE)) == 16


def _row(method, attacker, ssim, **kw):
    return {
        "table": "robustness",
        "dataset": "lfw",
        "method": method,
        "attacker": attacker,
        "ssim": ssim,
        "psnr": 10.0,
        "mse": 0.1,
        "srra": 0.5,
        "srra_far": 0.25,
        "chance_srra": 0.01,
        "chance_srra_far": 0.001,
        "threshold": 0.4,
        "threshold_far": 0.5,
        "n_images": 4,
        **kw,
    }


def test_report_names_the_strongest_attacker():
    rows = [
        _row("none", "paper-resrec", 0.8),
        _row("none", "inversion", 0.9),
        _row("floor-embedding", "floor-embedding", 0.4),
        {
            "table": "robustness",
            "dataset": "lfw",
            "method": "none",
            "attacker": None,
            "accuracy": 0.99,
            "accuracy_ci95": [0.98, 1.0],
            "n_pairs": 6000,
            "full_protocol": True,
            "stored_identity_cosine": 1.0,
        },
    ]
    assert strongest(rows, "lfw", "none", "ssim")["attacker"] == "inversion"
    meta = {
        "profile": get_profile("smoke").to_dict(),
        "device": "cpu",
        "machine": "x",
        "wall_s": 1.0,
        "complete": True,
        "splits": {"attacker": {"images": 3, "people": 2}, "server": {"images": 2, "people": 1}},
        "training": {
            "attacker-resrec": {
                "train_set": "a",
                "n_train": 3,
                "epochs": 1,
                "seconds": 1.0,
                "identity_overlap_with_test": 0,
                "loss_curve": [0.2],
            }
        },
    }
    md = render(meta, rows)
    assert "| none | inversion | 0.900" in md and "6000 (full)" in md
    assert "code: commit not recorded" in md
    assert "inversion" in summary(rows)


@pytest.mark.data
def test_smoke_bench_end_to_end_and_resumes(data_root, tmp_path):
    from advface.pipelines.robustness import run_bench

    out = tmp_path / "bench"
    res = run_bench(get_profile("smoke"), out, progress=False)
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and {r["table"] for r in data["rows"]} == {"robustness"}
    assert "git_commit" in data and "unchecked" in data["splits"]["server"]["identity_check"]
    recon = {(r["method"], r["attacker"]) for r in data["rows"] if r.get("ssim") is not None}
    for m in METHODS:
        assert {(m, "paper-resrec"), (m, "inversion"), (m, "embedding")} <= recon
        assert (m, "embedding-ridge") in recon
        assert ((m, "embedding-inversion") in recon) == (m != "none")
        acc = [r for r in data["rows"] if r["method"] == m and r.get("accuracy") is not None]
        assert len(acc) == 1 and acc[0]["n_pairs"] == 20
        lo, hi = acc[0]["accuracy_ci95"]
        assert 0 <= lo <= acc[0]["accuracy"] <= hi <= 1 and hi > lo  # Wilson, over pairs
    # 20 sampled pairs hold 10 impostor pairs: no FAR = 1e-3 threshold, no such SRRA.
    assert all(r["srra_far"] is None for r in data["rows"] if r.get("ssim") is not None)
    # Every attacker on the same images with the same flips (mirrored images protected too).
    same = data["attacker_training"]
    assert same["flip"] is True and same["n_train"] == 24
    assert {r for r in data["training"] if r.startswith("adaptive")} <= set(same["attackers"])
    for role in same["attackers"]:
        t = data["training"][role]
        assert (t["data_sha256"], t["flip"]) == (same["data_sha256"], True), role
    for m in ("advface", "embedding-shadow"):
        assert {(m, "adaptive-own"), (m, "adaptive-leaked")} <= recon
    assert {("random", "adaptive-leaked"), ("dp", "adaptive-leaked")} <= recon
    assert ("floor-embedding", "floor-embedding") in recon
    assert ("floor-embedding-ridge", "floor-embedding-ridge") in recon
    # The ridge decoder: fit in closed form on the attackers' images and their mirrors.
    ridge = data["training"]["attacker-ridge"]
    assert ridge["closed_form"] and same["closed_form"] == ["attacker-ridge"]
    assert (ridge["data_sha256"], ridge["flip"]) == (same["data_sha256"], True)
    assert ridge["lambda"] in [float(k) for k in ridge["cv_mse"]]
    assert (
        "attacker-ridge (ridge regression; 5-fold cross-validation chose lambda"
        in (out / "report.md").read_text()
    )
    assert ("floor-mean-face", "floor-mean-face") in recon
    for role, t in data["training"].items():
        if role.startswith(("attacker", "adaptive")):
            assert t["identity_overlap_with_test"] == 0, role
    assert (out / "report.md").is_file() and (out / "frontier.png").is_file()
    assert "n/a (too few impostor pairs)" in (out / "report.md").read_text()
    # Resumes: a second run recomputes nothing and gives the same rows.
    again = run_bench(get_profile("smoke"), out, progress=False)
    assert again["stage_seconds"] == {}
    assert [r.get("ssim") for r in again["rows"]] == [r.get("ssim") for r in res["rows"]]
