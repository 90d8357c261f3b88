"""The report's explanation of each cell that differs from the paper beyond tolerance."""

from advface.pipelines.reproduce.explain import Flag, explain
from advface.pipelines.reproduce.profiles import get_profile
from advface.pipelines.reproduce.report import make_row, render_markdown


def _meta(acc_none: float = 0.99) -> dict:
    return {
        "profile": get_profile("cpu").to_dict(),
        "unprotected": {
            "lfw": {"accuracy": acc_none, "threshold": 0.34, "threshold_far_1e-3": 0.5,
                    "n_pairs": 6000, "full_protocol": True}
        },
        "training": {
            "attacker-resrec": {"epochs": 9, "n_train": 6797, "budget_seconds": 1800.0,
                                "loss_curve": [0.05, 0.03]},
            "shadow-resrec": {"epochs": 7, "n_train": 3150, "budget_seconds": 1800.0,
                              "loss_curve": [0.06, 0.04]},
        },
    }  # fmt: skip


def _flag(where: str, kind: str, ours: float, ref: float, row: dict) -> Flag:
    return Flag(where, kind, ours, ref, row, "lfw")


def test_accuracy_offset_of_the_backbone_explains_an_equal_drop():
    row = make_row(
        "table2", "lfw", "advface", accuracy=0.976, extra={"accuracy_ci95": [0.972, 0.98]}
    )
    text = explain(_flag("table2 advface lfw", "accuracy", 0.976, 0.9643, row), [row], _meta())
    # 99.00 -> 97.60 here, 98.13 -> 96.43 in the paper: the same drop within 1 point.
    assert "99.00% on the full protocol here and 98.13% in the paper" in text
    assert "-1.40 points here and -1.70 points in the paper" in text
    assert "the difference is the backbone's" in text and "sampling" not in text


def test_a_different_drop_names_the_setting_and_a_covered_value_says_sampling():
    rows = [make_row("readings", "lfw", "random", accuracy=0.85, extra={"reading": "accumulated"})]
    row = make_row("table2", "lfw", "random", accuracy=0.99, extra={"accuracy_ci95": [0.96, 0.997]})
    # 97.50 -> 99.00 here, 98.13 -> 97.20 in the paper: the changes differ by 2.4 points.
    text = explain(_flag("table2 random lfw", "accuracy", 0.99, 0.972, row), rows, _meta(0.975))
    assert "inside our 95% interval" in text and "the changes differ" in text
    assert "projected onto AdvFace's epsilon ball" in text and "85.00%" in text


def test_reconstruction_cells_start_from_the_attackers_unprotected_value():
    none = make_row("attackers", "lfw", "none", attacker="resrec", ssim=0.80)
    row = make_row("table1", "lfw", "none", attacker="resrec", ssim=0.80)
    text = explain(_flag("table1 none lfw", "ssim", 0.80, 0.93, row), [none, row], _meta())
    assert "9 epochs on 6797 images" in text and "starts from this value" in text
    adv = make_row("table1", "lfw", "advface", attacker="resrec", ssim=0.35)
    text = explain(_flag("table1 advface lfw", "ssim", 0.35, 0.28, adv), [none, adv], _meta())
    # -0.45 here against -0.65 in the paper: the protection's settings are named.
    assert "changes by -0.45 here and -0.65 in the paper" in text
    assert "the changes differ" in text and "shadow is a decoder" in text


def test_srra_cells_state_the_threshold_used():
    row = make_row(
        "table1", "lfw", "none", attacker="resrec", srra=1.0, extra={"srra_ci95": [0.99, 1.0]}
    )
    text = explain(_flag("table1 none lfw", "srra", 1.0, 0.974, row), [row], _meta())
    assert "operating threshold (0.340, cosine)" in text


def test_the_report_explains_every_flagged_cell():
    rows = [
        make_row("attackers", "lfw", "none", attacker="resrec", ssim=0.80, psnr=21.0),
        make_row("table1", "lfw", "none", attacker="resrec", ssim=0.80, psnr=21.0),
        make_row("table2", "lfw", "none", accuracy=0.99),
    ]
    md = render_markdown({**_meta(), "training": {}, "device": "cpu", "wall_s": 1.0}, rows)
    section = md.split("## Differences from the paper")[1]
    flagged = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(flagged) == 2 and all(". Why: " in line for line in flagged)  # ssim, psnr


def test_accuracy_changes_are_taken_on_the_same_sampled_pairs():
    # The sample is easier than the full protocol (95.5% vs 93.0%): the change from
    # unprotected must use the sample's own "none" row, not the full protocol's accuracy.
    none = make_row("table2", "lfw", "none", accuracy=0.955,
                    extra={"mode": "online", "n_pairs": 200, "full_protocol": False})  # fmt: skip
    row = make_row("table2", "lfw", "dp", accuracy=0.93, extra={"mode": "online"})
    text = explain(_flag("table2 dp lfw", "accuracy", 0.93, 0.9627, row), [none, row],
                   _meta(0.93))  # fmt: skip
    assert "on the same pairs is -2.50 points here" in text
    text = explain(_flag("table2 none lfw", "accuracy", 0.955, 0.9813, none), [none], _meta(0.93))
    assert "200 sampled pairs it scores 95.50%, +2.50 points from the full protocol" in text


def test_random_baseline_reports_both_readings_against_the_paper():
    acc = make_row("readings", "lfw", "random", accuracy=0.87, extra={"reading": "accumulated"})
    row = make_row("table2", "lfw", "random", accuracy=0.99)
    text = explain(
        _flag("table2 random lfw", "accuracy", 0.99, 0.972, row), [acc, row], _meta(0.975)
    )
    assert "-10.20 points from the paper, against +1.80 points" in text
    assert "neither reading reproduces the paper's value" in text


def test_transfer_attackers_without_a_paper_baseline_are_not_compared_with_resrec():
    urec = make_row("attackers", "lfw", "none", attacker="urec", ssim=0.78)
    row = make_row("table4", "lfw", "advface", attacker="urec", shadow="resrec", ssim=0.43)
    text = explain(_flag("table4 resrec->urec lfw", "ssim", 0.43, 0.29, row), [urec, row], _meta())
    assert "the paper reports no urec attacker on unprotected features (ours: 0.78)" in text
    assert "0.93 in the paper" not in text  # the paper's ResRec value is not the urec one's


def test_a_higher_srra_from_a_weaker_attacker_points_at_the_replay_test():
    meta = _meta()
    meta["unprotected"]["lfw"]["tar_at_far_1e-3"] = 0.55
    att = make_row("attackers", "lfw", "none", attacker="resrec", ssim=0.74, srra=1.0)
    row = make_row("table1", "lfw", "none", attacker="resrec", ssim=0.74, srra=1.0)
    text = explain(_flag("table1 none lfw", "srra", 1.0, 0.8971, row), [att, row], meta)
    assert "SSIM 0.74 vs 0.93" in text and "genuine pairs pass 55.00%" in text
    assert "the attacker is a decoder" not in text and "resrec attacker is a decoder" not in text


def test_marks_separate_sampling_noise_and_divergent_changes():
    none = make_row("table1", "lfw", "none", attacker="resrec", ssim=0.93, psnr=27.87,
                    mse=0.002, srra=0.974)  # fmt: skip
    # PSNR equals the paper's (22.81) but barely moves from unprotected (27.87 -> 27.8 here).
    rnd = make_row("table1", "lfw", "random", attacker="resrec", ssim=0.90, psnr=22.81,
                   mse=0.008, srra=0.9473)  # fmt: skip
    acc = make_row("table2", "lfw", "dp", accuracy=0.98,
                   extra={"mode": "online", "accuracy_ci95": [0.95, 0.99]})  # fmt: skip
    md = render_markdown(
        {**_meta(), "training": {}, "device": "cpu", "wall_s": 1.0}, [none, rnd, acc]
    )
    assert "- ≈ table2 dp lfw accuracy" in md  # 98.0 vs 96.27, inside [95, 99]
    assert "⚑" not in md.split("## Differences from the paper")[1]
    rnd2 = {**rnd, "psnr": 27.80}
    md = render_markdown({**_meta(), "training": {}, "device": "cpu", "wall_s": 1.0}, [none, rnd2])
    assert "- ⚑ table1 random lfw psnr" in md
    rnd3 = {**rnd, "psnr": 22.81}
    none3 = {**none, "psnr": 22.9}  # unprotected 22.9 -> 22.81: -0.09 against -5.06
    md = render_markdown({**_meta(), "training": {}, "device": "cpu", "wall_s": 1.0}, [none3, rnd3])
    assert "- Δ table1 random lfw psnr" in md


def test_report_states_missing_completeness_and_the_commit():
    rows = [make_row("table2", "lfw", "none", accuracy=0.99)]
    md = render_markdown({**_meta(), "training": {}, "device": "cpu", "wall_s": 1.0}, rows)
    assert "Completeness not recorded" in md and "commit not recorded" in md
    md = render_markdown(
        {**_meta(), "training": {}, "complete": True, "git_commit": "abc123", "wall_s": 1.0}, rows
    )
    assert "Completeness not recorded" not in md and "code abc123" in md
