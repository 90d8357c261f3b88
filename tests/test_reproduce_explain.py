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
    assert "99.00% here and 98.13% in the paper" in text
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
    section = md.split("## Deviations beyond tolerance")[1]
    flagged = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(flagged) == 2 and all(". Why: " in line for line in flagged)  # ssim, psnr
