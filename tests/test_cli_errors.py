"""Bad input to the CLI: ``error: ...`` and exit 2, no traceback, nothing created or half-written.

Every case here fails before any network is trained or any dataset is read.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from advface.cli import app
from advface.cli._errors import check_checkpoint_dir, load_failure, loading, user_errors


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Own cache folder (a serve that fails must leave no master key there); no service
    settings from the environment."""
    monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("DB_URL", "MASTER_KEY", "MASTER_KEY_FILE", "HEAD", "PROTECTION"):
        monkeypatch.delenv(f"ADVFACE_{name}", raising=False)


def _refused(res, *messages: str) -> None:
    """Exit 2 with an ``error:`` line holding ``messages``, and no traceback."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert "error:" in res.output and "Traceback" not in res.output, res.output
    for message in messages:
        assert message in res.output, (message, res.output)


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- weights and checkpoint files that do not load -------------------------------------------


@pytest.fixture()
def bad_weights(tmp_path: Path) -> dict[str, Path]:
    """Files named like weights that are not FaceNet's."""
    noise = bytes(range(256)) * 2
    files = {
        "garbage.safetensors": noise,
        "garbage.pt": noise,
        "empty.pt": b"",
        "text.pt": b"hello\n",
    }
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    torch.save({"other": torch.zeros(2)}, tmp_path / "other.pt")
    out["other.pt"] = tmp_path / "other.pt"
    return out


@pytest.mark.parametrize(
    "name, reason",
    [
        ("garbage.safetensors", "not a safetensors file"),
        ("garbage.pt", "not a torch weights file"),
        ("empty.pt", "not a torch weights file"),
        ("text.pt", "not a torch weights file"),
        ("other.pt", "tensors of another network: 602 missing"),
    ],
)
def test_eval_fr_names_weights_that_do_not_load(bad_weights, tmp_path, name, reason) -> None:
    path = bad_weights[name]
    res = _run("eval-fr", "--weights", path, "--data-root", tmp_path)
    _refused(res, f"--weights {path}: not a valid weights/checkpoint file", reason)
    assert len(res.output) < 600  # a short line, not torch's list of every key


def _shadow(folder: Path) -> Path:
    from advface.models.recon import build_recon, save_checkpoint

    save_checkpoint(folder, build_recon("resrec", blocks=1, width=4), "resrec", {})
    return folder


@pytest.fixture()
def maps(tmp_path: Path) -> Path:
    path = tmp_path / "in.safetensors"
    save_file({"z": torch.zeros(2, 64, 77, 77)}, str(path))
    return path


def test_protect_names_a_shadow_checkpoint_that_does_not_load(tmp_path, maps) -> None:
    """A damaged file is reported before FaceNet loads, naming the file; DST is not written."""
    dst = tmp_path / "out.safetensors"
    ck = _shadow(tmp_path / "ck")
    (ck / "model.safetensors").write_bytes(b"\x00" * 64)
    res = _run("protect", maps, dst, "--shadow", ck)
    _refused(res, f"--shadow {ck}", str(ck / "model.safetensors"), "not a safetensors file")
    ck = _shadow(tmp_path / "ck2")
    (ck / "config.json").write_text('{"arch": "resrec",, }')
    res = _run("protect", maps, dst, "--shadow", ck)
    _refused(res, f"--shadow {ck}", str(ck / "config.json"), "not valid JSON")
    assert not dst.exists()


def test_protect_names_a_shadow_with_another_networks_tensors(
    tmp_path, maps, random_facenet, monkeypatch
) -> None:
    import advface.models.facenet as facenet

    monkeypatch.setattr(facenet, "load_facenet", lambda *a, **k: random_facenet)
    ck = _shadow(tmp_path / "ck")
    save_file({"x": torch.zeros(2)}, str(ck / "model.safetensors"))
    dst = tmp_path / "out.safetensors"
    res = _run("protect", maps, dst, "--shadow", ck)
    _refused(res, f"--shadow {ck}: not a valid weights/checkpoint file", "1 unexpected (x)")
    assert not dst.exists()


def test_load_failures_without_a_file_name_are_user_errors(capsys) -> None:
    """What a command that does not name the file (``user_errors`` alone) prints."""
    from safetensors import SafetensorError

    mismatch = 'Error(s) in loading state_dict for M:\n\tMissing key(s) in state_dict: "a". '
    for exc, reason in [
        (SafetensorError("Error while deserializing header: header too large"), "safetensors"),
        (pickle.UnpicklingError("invalid load key, 'x'."), "torch weights"),
        (RuntimeError(mismatch), "1 missing (a)"),
    ]:
        with pytest.raises(typer.Exit) as got, user_errors():
            raise exc
        assert got.value.exit_code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: not a valid weights/checkpoint file") and reason in err
    for other in (RuntimeError("CUDA out of memory"), KeyError("x")):  # not about a file
        assert load_failure(other) is None
        with pytest.raises(type(other)), user_errors():
            raise other


def test_loading_names_the_file_and_leaves_other_errors_alone(tmp_path) -> None:
    named = r"^--weights w\.pt: not a valid .*torch weights"
    with pytest.raises(ValueError, match=named), loading(("--weights", "w.pt")):
        raise pickle.UnpicklingError("bad")
    with pytest.raises(pickle.UnpicklingError), loading(("--weights", None)):  # a default
        raise pickle.UnpicklingError("bad")
    with pytest.raises(ValueError, match="^unknown method"), loading(("--shadow", "ck")):
        raise ValueError("unknown method")
    check_checkpoint_dir(tmp_path / "missing", "--shadow")  # the loader says it is missing


# -- eval-offline and distill: checked before any work ---------------------------------------


def test_eval_offline_checks_its_output_first(tmp_path: Path) -> None:
    head = tmp_path / "head"  # not a real head: the checks below come before it is read
    head.mkdir()
    res = _run("eval-offline", head, "--out", tmp_path / "missing" / "x.json")
    _refused(res, "no folder")
    res = _run("eval-offline", head, "--out", tmp_path)
    _refused(res, "is a folder")
    kept = tmp_path / "kept.json"
    kept.write_text("{}\n")
    res = _run("eval-offline", head, "--out", kept)
    _refused(res, "exists; pass --overwrite")
    assert kept.read_text() == "{}\n"
    res = _run("eval-offline", head, "--dataset", "agedb")
    _refused(res, "--dataset must be one of lfw, cfp-fp, cfp-ff")
    res = _run("eval-offline", head)
    _refused(res, "is not a distilled head")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head", "kept.json"]


def test_distill_refuses_an_unknown_eval_dataset_before_training(tmp_path: Path) -> None:
    out = tmp_path / "student"
    res = _run("distill", "--out", out, "--eval-dataset", "bogus", "--data-root", tmp_path)
    _refused(res, "--eval-dataset must be one of")
    res = _run("distill", "--out", out, "--data-root", tmp_path / "none")
    _refused(res, "does not exist")
    assert not out.exists() and not out.with_name("student.work").exists()


def test_distill_overwrite_drops_the_old_heads_evaluations(tmp_path, monkeypatch) -> None:
    import advface.pipelines.offline as offline

    out = tmp_path / "student"
    out.mkdir()
    for name in ("eval-lfw.json", "eval-cfp-fp.json", "notes.json"):
        (out / name).write_text("{}\n")

    def fake_distill(spec, folder, **kw):
        assert kw["overwrite"]
        return {
            "model_version": "v",
            "data": {"images": 1, "identity_check": {"overlap": 0}},
            "record": dict.fromkeys(
                ("loss_before", "loss_after", "steps", "stopped_by", "seconds")
            ),
        }

    monkeypatch.setattr(offline, "run_distill", fake_distill)
    res = _run("distill", "--out", out, "--overwrite", "--data-root", tmp_path)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.json"]  # not ours: kept


def test_eval_offline_writes_its_row_atomically(tmp_path: Path) -> None:
    from advface.cli.offline import _write_json

    path = tmp_path / "row.json"
    path.write_text("old")
    _write_json(path, {"accuracy": 0.9})
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["row.json"]  # no temporary file left
    with pytest.raises(TypeError):
        _write_json(path, {"x": object()})  # fails while serialising: the old file stays
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["row.json"]


# -- bench and reproduce: names and the data root before OUT ---------------------------------


def test_bench_refuses_a_dataset_it_does_not_run(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    for args, message in [
        (["--dataset", "cfp"], "--dataset takes lfw, cfp-fp, got 'cfp'"),
        (["--dataset", "lfw", "--dataset", "lfw"], "given twice"),
        (["--data-root", tmp_path / "none"], "does not exist"),
    ]:
        _refused(_run("bench", "--profile", "smoke", "--out", out, *args), message)
    assert not out.exists()


def test_protect_bulk_names_weights_that_do_not_load(tmp_path: Path, maps: Path) -> None:
    dst, weights = tmp_path / "out", tmp_path / "w.pt"
    weights.write_bytes(b"not torch")
    res = _run("protect-bulk", maps, dst, "--protection", "none", "--engine", "serial",
               "--weights", weights)  # fmt: skip
    _refused(res, f"--weights {weights}: not a valid weights/checkpoint file")
    assert not dst.exists()


def test_reproduce_checks_the_data_root_before_creating_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _run("reproduce", "--profile", "smoke", "--out", out, "--data-root", tmp_path / "none")
    _refused(res, "does not exist")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not torch")
    res = _run("reproduce", "--profile", "smoke", "--out", out, "--data-root", tmp_path,
               "--weights", weights)  # fmt: skip
    _refused(res, f"--weights {weights}: not a valid weights/checkpoint file")
    assert not out.exists()


# -- prepare ---------------------------------------------------------------------------------


def test_prepare_refuses_a_download_url_without_download(tmp_path: Path) -> None:
    res = _run("prepare", "lfw", "--download-url", "http://127.0.0.1:1/", "--data-root", tmp_path)
    _refused(res, "--download-url applies only with --download")
    assert list(tmp_path.iterdir()) == []


# -- the service's start-up: checked before a database or master key exists ------------------


def test_serve_refuses_bad_settings_with_an_error_line(tmp_path: Path) -> None:
    db = tmp_path / "svc.db"
    url = f"sqlite:///{db}"
    base = ["serve", "--db-url", url, "--backend", "toy"]
    for args, message in [
        (["--threshold", "7"], "threshold must be a cosine similarity"),
        (["--log-level", "bogus"], "--log-level must be one of critical, error, warning"),
        (["--protection-params", "{not json"], "--protection-params is not JSON"),
        (["--protection-params", "[1]"], "must be a JSON object"),
        (["--protection", "random", "--protection-params", '{"bogus": 1}'], "bogus"),
        (["--protection", "nope"], "nope"),
    ]:
        res = _run(*base, *args)
        _refused(res, message)
        assert "Invalid value" not in res.output
    res = _run(*base, "--torch-threads", "-3")
    assert res.exit_code == 2 and "--torch-threads" in res.output
    res = _run("serve", "--db-url", "foo", "--backend", "toy")
    _refused(res, "cannot open database foo")
    assert not db.exists() and not (tmp_path / "cache" / "master.key").exists()


def test_reembed_and_migrate_refuse_bad_settings_with_an_error_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'svc.db'}"
    res = _run("reembed", "--db-url", url, "--backend", "nope")
    _refused(res, "backend must be 'facenet' or 'toy'")
    res = _run("migrate", "--protection", "none", "--db-url", "foo", "--backend", "toy")
    _refused(res, "cannot open database foo")
    assert not (tmp_path / "svc.db").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold-far", "0.5"], "--threshold-far needs --threshold"),
        (["--threshold", "1.5"], "--threshold must be a cosine similarity"),
        (["--threshold", "0.3", "--threshold-far", "nan"], "--threshold-far must be a cosine"),
    ],
)
def test_attack_refuses_bad_replay_thresholds_before_loading(tmp_path, flags, message) -> None:
    res = _run("attack", "--attacker", tmp_path / "no-checkpoint", "--dataset", "lfw", *flags)
    _refused(res, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval-fr", "--dataset", "lfw", "--device", "gpu"], "is not a device"),
        (["reproduce", "--profile", "smoke", "--device", "mps"], "only cpu and cuda"),
        (["train-recon", "--device", "cuda:x"], "is not a device"),
        (["protect-bulk", "a", "b", "--protection", "none", "--device", "foo"], "is not a device"),
    ],
)
def test_a_bad_device_is_refused_while_parsing(tmp_path: Path, args, message) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "cache").exists()  # refused before anything was loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_where_there_is_none(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["protect", "a", "b", "--method", "none", "--device", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.output, res.output
    # Ray workers may have GPUs this machine lacks: bulk checks the name only.
    from advface.cli._options import check_device_name

    assert check_device_name("cuda:1") == "cuda:1"
