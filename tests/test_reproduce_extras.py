"""Reproduce's offline rows (distilled heads, given heads) and the robustness bench's rows."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advface.cli import app
from advface.pipelines.reproduce.profiles import PROFILES, get_profile


def test_profile_offline_and_robustness_fields_are_validated():
    smoke, full, paper = PROFILES["smoke"], PROFILES["cpu-full"], PROFILES["paper"]
    assert smoke.offline == ("advface",) and smoke.robustness is None  # smoke stays fast
    assert "advface" in full.offline and full.robustness == "cpu"
    assert "advface" in paper.offline and paper.robustness == "gpu"
    bad = [
        dict(offline=("none",)),  # no offline row without a protection
        dict(offline=("advface", "advface")),
        dict(distill_limit=0),
        dict(distill_epochs=0),
        dict(distill_minutes=0.0),
        dict(robustness="huge"),
    ]
    for change in bad:
        with pytest.raises(ValueError, match=next(iter(change)).split("_")[0]):
            get_profile("smoke", **change)
    assert get_profile("smoke", robustness="smoke", offline=()).robustness == "smoke"


# -- the offline stage ----------------------------------------------------------------------------


def _run_context(tmp_path, facenet, **overrides):
    from advface.pipelines.reproduce.networks import Context

    prof = get_profile("smoke", **{"steps": 1, **overrides})
    return Context.from_facenet(prof, tmp_path / "run", facenet, data_root=tmp_path)


class _Calls(list):
    """The stand-in distillation's calls, and the made-up faces it reads (``faces``)."""

    faces: dict[str, np.ndarray]


@pytest.fixture
def stand_in(monkeypatch):
    """run_distill replaced by a stand-in that saves a (slightly changed) copy of the teacher;
    CelebA's server half by eight made-up keys and faces. Returns the list of calls."""
    import advface.data.prepare as prepare
    import advface.data.splits as splits
    import advface.pipelines.offline as offline
    from advface.data.splits import IdentitySplit
    from advface.models.distill import save_student, state_fingerprint
    from advface.models.split import split_facenet

    keys = [f"{i:06d}.jpg" for i in range(8)]
    server = IdentitySplit("celeba-server", "celeba", keys, [f"celeba:{i}" for i in range(8)])
    monkeypatch.setattr(splits, "celeba_split", lambda root, part: server)
    calls = _Calls()
    calls.faces = {k: np.full((160, 160, 3), i, np.uint8) for i, k in enumerate(keys)}

    def source_fingerprint(dataset, ks, data_root=None) -> str:  # of the made-up faces
        return hashlib.sha256(b"".join(calls.faces[k].tobytes() for k in ks)).hexdigest()[:16]

    monkeypatch.setattr(prepare, "source_fingerprint", source_fingerprint)

    def fake_run_distill(prot, out, *, facenet, settings, limit, overwrite, **kw):
        assert overwrite and kw["work_dir"].name == out.name + ".work"
        calls.append({"params": prot.params(), "settings": settings, "limit": limit})
        _, head = split_facenet(facenet)
        student = copy.deepcopy(head)
        with torch.no_grad():
            student.last_linear.weight.add_(0.001 * len(calls))
        return save_student(
            out, student, teacher_fingerprint=state_fingerprint(head), train_from="last_linear",
            protection=offline._protection_record(prot), data={"images": limit},
            record={"history": [{"protected": 0.1}], "stopped_by": "epochs",
                    "loss_before": {"protected": 0.2}, "loss_after": {"protected": 0.1}},
        )  # fmt: skip

    monkeypatch.setattr(offline, "run_distill", fake_run_distill)
    return calls


def _nets():
    from advface.models.recon import build_recon
    from advface.pipelines.reproduce.networks import Networks

    torch.manual_seed(0)
    return Networks({}, {"resrec": build_recon("resrec", width=4).eval()}, {})


def test_offline_stage_is_keyed_by_protection_settings_and_weights(
    tmp_path, random_facenet, stand_in
):
    """An identical rerun reuses the distilled head; a change of any protection parameter,
    of the distillation settings, of FaceNet's weights or of a face distils a new one."""
    from advface.pipelines.reproduce.extras import offline_heads

    facenet, nets = copy.deepcopy(random_facenet), _nets()
    ctx = _run_context(tmp_path, facenet)
    heads = offline_heads(ctx, nets)
    assert list(heads) == ["advface-distilled"] and len(stand_in) == 1
    head = heads["advface-distilled"]
    assert head.method == "advface" and head.version.startswith("psi-distilled-")
    assert stand_in[0]["params"]["epsilon"] == ctx.profile.epsilon  # the online row's AdvFace
    assert stand_in[0]["limit"] == 8 and stand_in[0]["settings"].epochs == 1
    rec = ctx.heads["advface-distilled"]
    assert rec["source"] == "distilled" and rec["model_version"] == head.version
    again = offline_heads(_run_context(tmp_path, facenet), nets)
    assert len(stand_in) == 1 and again["advface-distilled"].version == head.version
    changes = [dict(epsilon=0.1), dict(alpha=0.1), dict(steps=2), dict(distill_epochs=2),
               dict(distill_minutes=5.0), dict(distill_limit=4)]  # fmt: skip
    for i, change in enumerate(changes, start=2):
        offline_heads(_run_context(tmp_path, facenet, **change), nets)
        assert len(stand_in) == i, change
    with torch.no_grad():  # a head weight: only FaceNet's fingerprint sees it
        facenet.last_linear.weight.add_(0.01)
    offline_heads(_run_context(tmp_path, facenet), nets)
    assert len(stand_in) == len(changes) + 2
    stand_in.faces["000003.jpg"] = stand_in.faces["000003.jpg"] + 1  # same name, new image
    offline_heads(_run_context(tmp_path, facenet), nets)
    assert len(stand_in) == len(changes) + 3
    methods = offline_heads(_run_context(tmp_path, facenet, offline=("dp", "random")), nets)
    assert {h.method for h in methods.values()} == {"dp", "random"}


def test_given_heads_load_on_this_psi_and_name_their_method(tmp_path, random_facenet):
    from advface.models.distill import save_student, state_fingerprint
    from advface.pipelines.reproduce.extras import check_given, given_heads

    ctx = _run_context(tmp_path, random_facenet)
    fp = state_fingerprint(ctx.head)
    for name in ("advface", "none"):
        save_student(tmp_path / name, copy.deepcopy(ctx.head), teacher_fingerprint=fp,
                     train_from="last_linear", protection={"name": name})  # fmt: skip
    heads = given_heads(ctx, {"mine": tmp_path / "advface"})
    assert heads["mine"].method == "advface" and ctx.heads["mine"]["source"].endswith("advface")
    check_given(ctx, _nets(), ["mine"])
    assert ctx.heads["mine"]["protection_matches_run"] is False  # made for another AdvFace
    with pytest.raises(ValueError, match="distilled for 'none'"):
        given_heads(ctx, {"x": tmp_path / "none"})


# -- the robustness bench's rows ------------------------------------------------------------------


def test_robustness_rows_are_merged_and_reported(tmp_path, random_facenet, monkeypatch):
    import advface.pipelines.robustness as robustness
    from advface.pipelines.reproduce.extras import robustness_rows
    from advface.pipelines.reproduce.report import ROW_KEYS, make_row, render_markdown

    calls = []
    bench_rows = [
        {"table": "robustness", "dataset": "lfw", "method": "advface", "attacker": "resrec",
         "ssim": 0.3, "srra": 0.5, "srra_chance": 0.01},
        {"table": "robustness", "dataset": "lfw", "method": "none", "accuracy": 0.98},
    ]  # fmt: skip

    def fake_bench(profile, out, **kw):
        calls.append((profile.name, out, kw["device"]))
        return {"rows": bench_rows, "complete": True, "wall_s": 2.0}

    monkeypatch.setattr(robustness, "run_bench", fake_bench)
    ctx = _run_context(tmp_path, random_facenet)
    assert robustness_rows(ctx, tmp_path, None) == ([], None) and not calls  # smoke: no bench
    ctx = _run_context(tmp_path, random_facenet, robustness="cpu")
    rows, info = robustness_rows(ctx, tmp_path, None)
    assert calls == [("cpu", tmp_path / "robustness", "cpu")]
    assert len(rows) == 2 and all(set(ROW_KEYS) <= set(r) for r in rows)
    assert rows[0]["srra_chance"] == 0.01 and rows[1]["accuracy"] == 0.98
    assert info["report"] == "robustness/report.md" and info["complete"]
    meta = {"profile": ctx.profile.to_dict(), "robustness": info}
    md = render_markdown(meta, [make_row("table2", "lfw", "none", accuracy=0.99), *rows])
    assert "## Robustness bench" in md and "(robustness/report.md)" in md and "2 rows" in md


def test_report_draws_the_benchs_floors_beside_table1():
    from advface.pipelines.reproduce.report import _floor_lines, make_row, render_markdown

    def floor(method, ssim, srra, n):
        return {"table": "robustness", "dataset": "lfw", "method": method, "attacker": method,
                "ssim": ssim, "srra": srra, "n_images": n}  # fmt: skip

    rows = [
        floor("floor-embedding", 0.44, 0.02, 64),
        floor("floor-embedding-inversion", 0.18, 1.0, 12),
        floor("floor-mean-face", 0.45, 0.0, 64),
        {**floor("advface", 0.9, 1.0, 64), "attacker": "inversion"},  # not a floor
        make_row("table1", "lfw", "none", ssim=0.8, psnr=20.0, mse=0.01, srra=1.0),
    ]
    lines = _floor_lines(rows)
    assert (
        "- lfw: mean face SSIM 0.45 (n=64); embedding only: SSIM 0.44 (floor-embedding, "
        "n=64), SRRA 100.00% (floor-embedding-inversion, n=12)"
    ) in lines
    assert not [line for line in lines if "advface" in line]
    assert _floor_lines(rows[3:]) == []  # no bench: no floor lines
    meta = {"profile": get_profile("smoke").to_dict()}
    md = render_markdown(meta, rows)
    assert md.index("Floors beside Table 1") < md.index("## Table 2")


# -- the CLI's --head -----------------------------------------------------------------------------


def test_cli_datasets_option_keeps_the_profiles_order_and_refuses_others(tmp_path):
    from advface.cli.reproduce import parse_datasets

    both = ("lfw", "cfp-fp")
    assert parse_datasets("cfp-fp, lfw", both) == both
    assert parse_datasets("cfp-fp", both) == ("cfp-fp",)
    for bad in ("", "agedb", "lfw,lfw", "lfw,x"):
        with pytest.raises(ValueError, match="--datasets takes"):
            parse_datasets(bad, both)
    args = ["reproduce", "--profile", "smoke", "--out", str(tmp_path / "o"), "--datasets", "x"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--datasets takes" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_head_option_is_parsed_and_bad_forms_exit_2(tmp_path):
    from advface.cli.reproduce import parse_heads

    (tmp_path / "h").mkdir()
    assert parse_heads([f"mine={tmp_path / 'h'}"]) == {"mine": tmp_path / "h"}
    for bad, msg in [
        (["nolabel"], "LABEL=DIR"),
        ([f"={tmp_path / 'h'}"], "LABEL=DIR"),
        (["x="], "LABEL=DIR"),
        ([f"x={tmp_path / 'missing'}"], "no folder"),
        ([f"x={tmp_path / 'h'}", f"x={tmp_path / 'h'}"], "given twice"),
        ([f"psi={tmp_path / 'h'}"], "cannot be labelled 'psi'"),
    ]:
        args = ["reproduce", "--profile", "smoke", "--out", str(tmp_path / "out")]
        for spec in bad:
            args += ["--head", spec]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and msg in res.output, (bad, res.output)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cli_report_rerenders_from_results_and_refuses_bad_files(tmp_path):
    from advface.pipelines.reproduce.report import make_row, render_markdown, write_json

    rows = [make_row("table2", "lfw", "none", accuracy=0.99)]
    meta = {"profile": get_profile("smoke").to_dict(), "complete": True, "wall_s": 1.0}
    write_json(tmp_path / "results.json", meta, rows)
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report.md").read_text()
    assert md == render_markdown(meta, rows) and (tmp_path / "table2.csv").is_file()
    for name, text in [("missing", None), ("broken", "{"), ("norows", '{"profile": {}}')]:
        folder = tmp_path / name
        folder.mkdir()
        if text is not None:
            (folder / "results.json").write_text(text)
        res = CliRunner().invoke(app, ["report", str(folder)])
        assert res.exit_code == 2 and "error:" in res.output, (name, res.output)
        assert not (folder / "report.md").exists()


def test_cli_report_refuses_malformed_results_and_writes_nothing(tmp_path):
    """Rows and profile are checked, and report.md rendered in memory, before any file is
    written: a results.json the report cannot read leaves no CSV or report behind."""
    import json

    from advface.pipelines.reproduce.report import make_row

    profile = json.loads(json.dumps(get_profile("smoke").to_dict()))
    no_datasets = {k: v for k, v in profile.items() if k != "datasets"}
    good = make_row("table2", "lfw", "none", accuracy=0.99)
    offline = make_row("table2", "lfw", "advface", accuracy=0.9, extra={"mode": "offline"})
    for name, data, msg in [
        ("no-table", {"profile": profile, "rows": [{"x": 1}]}, "row 0 has no table"),
        ("not-object", {"profile": profile, "rows": [good, 1]}, "row 1 is not a JSON object"),
        ("no-dataset", {"profile": profile, "rows": [{"table": "t1", "x": 1}]}, "no dataset"),
        ("profile", {"profile": no_datasets, "rows": [good]}, "the profile lacks datasets"),
        ("archs", {"profile": {**profile, "archs": "resrec"}, "rows": [good]}, "archs is not"),
        ("no-head", {"profile": profile, "rows": [good, offline]}, "cannot read (missing 'head')"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(data))
        res = CliRunner().invoke(app, ["report", str(folder)])
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (name, res.output)
        assert "error:" in res.output and msg in res.output, (name, res.output)
        assert [p.name for p in folder.iterdir()] == ["results.json"], name
