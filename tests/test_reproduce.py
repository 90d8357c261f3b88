import json

import pytest

from advface.pipelines.reproduce import paper
from advface.pipelines.reproduce.headline import headline_table
from advface.pipelines.reproduce.profiles import PROFILES, get_profile
from advface.pipelines.reproduce.report import ROW_KEYS, make_row, render_markdown
from advface.pipelines.stages import StageCache, settings_key


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
    head = headline_table(rows)
    assert "| none |" in md and head.count("\n") == 2 and "accuracy on lfw" in head


def test_stage_cache_reuses_results(tmp_path):
    cache = StageCache(tmp_path)
    calls = []
    value = cache.json("x", {"a": 1}, lambda: calls.append(1) or {"v": 2})
    again = cache.json("x", {"a": 1}, lambda: calls.append(1) or {"v": 3})
    assert value == again == {"v": 2} and len(calls) == 1
    assert settings_key({"a": 1}) != settings_key({"a": 2})


def test_stage_cache_records_compute_seconds_across_runs(tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import save_file

    def compute(sl):
        return {"x": np.arange(sl.start, min(sl.stop, 5), dtype=np.float32)}

    first = StageCache(tmp_path)
    out = first.chunked("s", {"a": 1}, list("abcde"), 2, compute)
    assert out["x"].tolist() == [0, 1, 2, 3, 4]
    spent = first.compute_seconds["s"]
    assert spent is not None and spent >= 0 and set(first.compute_seconds) == {"s"}
    # A later run that only reads the chunks reports what computing them took.
    again = StageCache(tmp_path)
    again.chunked("s", {"a": 1}, list("abcde"), 2, lambda sl: pytest.fail("recomputed"))
    assert again.compute_seconds["s"] == pytest.approx(spent, abs=0.01)
    # A file written without the record makes the total unknown rather than too small.
    old = StageCache(tmp_path)
    save_file({"x": torch.zeros(1)}, str(old.path("t", {}, ".safetensors")))
    old.arrays("t", {}, lambda: pytest.fail("recomputed"))
    assert old.compute_seconds["t"] is None


def test_profiles_and_paper_tables_are_consistent():
    assert set(PROFILES) == {"smoke", "cpu", "cpu-full", "paper"}
    with pytest.raises(ValueError):
        get_profile("huge")
    with pytest.raises(ValueError, match="attacker_set"):
        get_profile("smoke", attacker_set="lfw-nonpairs")
    full = PROFILES["cpu-full"]  # full protocols, attackers trained for 30 minutes or more
    assert full.pairs_per_fold is None and full.fr_full and full.max_minutes >= 30
    assert PROFILES["cpu"].pairs_per_fold is not None  # a stated sample
    for shadow, attacker in paper.TABLE4:
        assert shadow in PROFILES["paper"].archs and attacker in PROFILES["paper"].archs


@pytest.mark.data
def test_smoke_profile_end_to_end_and_resumes(data_root, tmp_path, monkeypatch):
    from advface.pipelines.reproduce import run
    from advface.pipelines.reproduce.run import reproduce

    out = tmp_path / "smoke"

    # Interrupted in the second dataset: what was done is written, marked partial.
    def stop(ctx, ev, nets):
        if ev.dataset == "cfp-fp":
            raise KeyboardInterrupt
        return []

    monkeypatch.setattr(run, "TABLES", (*run.TABLES, stop))
    with pytest.raises(KeyboardInterrupt):
        reproduce(get_profile("smoke"), out, progress=False)
    part = json.loads((out / "results.json").read_text())
    assert part["complete"] is False and part["parts_done"] == ["decoders", "offline heads", "lfw"]
    assert part["parts_pending"] == ["cfp-fp"] and part["training"]
    assert {r["dataset"] for r in part["rows"]} == {"lfw"}
    assert "**Partial results**" in (out / "report.md").read_text()
    monkeypatch.undo()
    res = reproduce(get_profile("smoke"), out, progress=False)
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True and data["parts_pending"] == []
    assert "Partial results" not in (out / "report.md").read_text()
    tables = {r["table"] for r in data["rows"]}
    assert {"table1", "table2", "table3", "table4", "fig4", "adaptive", "readings"} <= tables
    for r in data["rows"]:
        assert set(ROW_KEYS) <= set(r)
        for k in ("accuracy", "srra"):
            assert r[k] is None or 0.0 <= r[k] <= 1.0
    report = (out / "report.md").read_text()
    assert report.startswith("# AdvFace reproduction") and "identity overlap" in report
    assert "MTCNN fallbacks" in report and "seeded (seed 0) random sample" in report
    assert "JPEG at quality 95" in report  # the figures say how their grids were kept
    assert (out / "table1.csv").exists() and (out / "loss_curves.png").exists()
    # Attackers never saw a test person (counted by name); their records say so.
    attackers = {k: v for k, v in data["training"].items() if not k.startswith("shadow")}
    assert set(attackers) == {"attacker-transrec", "attacker-resrec", "attacker-urec",
                              "adaptive-resrec"}  # fmt: skip
    for rec in attackers.values():
        assert rec["identity_overlap_with_test"] == 0 and rec["identity_check"]["checked_by_name"]
        assert rec["train_set"].startswith("lfw-attacker") and rec["loss_curve"]
    assert data["splits"]["server"]["identity_check"]["overlap"] == 0
    assert all(f["fallbacks"] >= 0 and f["images"] > 0 for f in data["fallbacks"].values())
    assert {"lfw pairs", "cfp-fp pairs", "lfw test faces"} <= set(data["fallbacks"])
    for r in data["rows"]:
        if r["accuracy"] is not None:
            assert r["n_pairs"] == 20 and r["accuracy_ci95"][0] <= r["accuracy"]
            assert r["full_protocol"] is False
    assert "bn" in data["protections"]["advface-resrec-eps0.20"]
    spent = data["stage_compute_seconds"]
    assert spent["stored-lfw-advface-resrec-eps0.20"] > 0 and spent["recon-lfw-none"] > 0
    assert "Compute time of the cached stages" in report
    # The offline head reads the same protection pass of the stored side as Psi: one stage.
    offline = [r for r in data["rows"] if r["table"] == "table2" and r.get("mode") == "offline"]
    assert {r["dataset"] for r in offline} == {"lfw", "cfp-fp"}
    assert all(r["head"] == "advface-distilled" and r["accuracy"] is not None for r in offline)
    stored = {p.name.rsplit("-", 2)[0] for p in (out / "cache").glob("stored-lfw-advface-*")}
    assert "stored-lfw-advface-resrec-eps0.20" in stored and not any("distil" in s for s in stored)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()}
    again = reproduce(get_profile("smoke"), out, progress=False)
    assert again["rows"] == res["rows"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # every stage reused
    # Stages are keyed by what they depend on: a changed note or sweep recomputes nothing old.
    reproduce(get_profile("smoke", notes=("other note",), sweep=(0.2,)), out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # One dataset alone, as a helper process sharing OUT runs it: the same stages, no results.
    written = (out / "results.json").stat().st_mtime_ns
    reproduce(get_profile("smoke", datasets=("cfp-fp",)), out, progress=False, write=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "results.json").stat().st_mtime_ns == written
    assert {p for p in (out / "cache").rglob("*") if p.is_file()} == set(stamps)
    # A setting's record stands for its chunks: with the records (and networks) alone, as
    # carried to another machine, the results come back the same and nothing is recomputed.
    chunks = [p for p in (out / "cache").glob("*.safetensors")
              if p.name.startswith(("recon-", "stored-"))]  # fmt: skip
    assert chunks and list((out / "cache").glob("record-lfw-advface-resrec-eps0.20-*.json"))
    for p in chunks:
        p.unlink()
    carried = reproduce(get_profile("smoke"), out, progress=False)
    assert carried["rows"] == res["rows"]
    assert not any((out / "cache").glob("recon-*")) and not any((out / "cache").glob("stored-*"))
    assert carried["stage_compute_seconds"] == res["stage_compute_seconds"]


def test_memo_features_protects_each_image_once():
    import torch

    from advface.attacks.train import MemoFeatures

    calls: list[int] = []

    def fn(z: torch.Tensor) -> torch.Tensor:
        calls.append(len(z))
        return z + 1

    memo = MemoFeatures(fn)
    z = torch.randn(4, 2, 3, 3)
    first = memo.lookup([(i, False) for i in range(4)], lambda rows: z[rows])
    # Keys are (image index, flipped), not values: a map that differs in its last bits (another
    # batch size or kernel) is still found.
    again = memo.lookup([(2, False), (0, False)], lambda rows: z[[2, 0]][rows] + 1e-6)
    assert calls == [4]
    assert torch.allclose(first, z + 1, atol=1e-2) and torch.equal(again, first[[2, 0]])
    memo.lookup([(0, False), (0, True)], lambda rows: z[:2][rows])
    assert calls == [4, 1] and len(memo) == 5


# -- identity, caches, resume, one evaluation path ------------------------------------------------


def _context(tmp_path, facenet, data_root=None, **overrides):
    from advface.pipelines.reproduce.networks import Context

    prof = get_profile("smoke", **{"protect_batch": 2, "chunk": 4, "grid_n": 1, **overrides})
    return Context.from_facenet(prof, tmp_path / "run", facenet, data_root=data_root or tmp_path)


def test_identity_record_refuses_a_shared_person():
    from advface.data.splits import IdentitySplit
    from advface.pipelines.reproduce.networks import identity_record

    test = IdentitySplit("lfw-test", "lfw", ["A/A_1.jpg"], ["ann"])
    clean = IdentitySplit("train", "lfw", ["B/B_1.jpg", "C/C_1.jpg"], ["bob", "cy"])
    record = identity_record(clean, [test])
    assert record["overlap"] == 0 and record["checked_by_name"]
    leaky = IdentitySplit("train", "lfw", ["A/A_2.jpg", "B/B_1.jpg"], ["ann", "bob"])
    with pytest.raises(ValueError, match="shares identities"):
        identity_record(leaky, [test])
    celeba = IdentitySplit("celeba-attacker", "celeba", ["1.jpg"], ["celeba:1"])
    assert identity_record(celeba, [test])["overlap"] is None  # anonymous ids: stated


def test_stage_keys_follow_weights_and_every_protection_parameter(
    tmp_path, random_facenet, monkeypatch
):
    """An identical rerun reuses the stage; a change of FaceNet's or the shadow's weights, or of
    any protection parameter (bn, clamp_min, extractor_input, ...) recomputes it."""
    import copy

    import numpy as np
    import torch

    from advface.models.recon import build_recon
    from advface.pipelines.reproduce import evaluate
    from advface.pipelines.reproduce.evaluate import TestFaces, recon_stage
    from advface.protection import build_protection

    facenet = copy.deepcopy(random_facenet)
    ctx = _context(tmp_path, facenet)
    monkeypatch.setattr(evaluate, "_faces_key", lambda c, aligned, keys: ",".join(keys))
    torch.manual_seed(0)
    shadow, attacker = build_recon("resrec", width=4), build_recon("transrec", width=4)
    images = (np.random.default_rng(0).random((2, 160, 160, 3)) * 255).astype(np.uint8)
    faces = TestFaces("lfw", ["a", "b"], images, np.zeros((2, 512), np.float32))

    def run(c, prot) -> set[str]:
        recon_stage(c, faces, "x", prot, {"resrec": attacker}, {"resrec": "k"}, {"resrec"})
        return {p.name for p in (tmp_path / "run" / "cache").iterdir()}

    def advface(c=ctx, net=shadow, **kw):
        return build_protection("advface", shadow=net, extractor=c.encoder, steps=1, **kw)

    first = run(ctx, advface())
    stamps = {n: (tmp_path / "run" / "cache" / n).stat().st_mtime_ns for n in first}
    assert run(ctx, advface()) == first  # identical rerun: cached
    assert {n: (tmp_path / "run" / "cache" / n).stat().st_mtime_ns for n in first} == stamps
    seen = first
    changes = [
        dict(bn="sample"),
        dict(clamp_min=0.0),
        dict(extractor_input="unit"),
        dict(epsilon=0.1),
        dict(alpha=0.1),
        dict(reading="per-step"),
        dict(seed=1),
    ]
    for change in changes:
        now = run(ctx, advface(**change))
        assert len(now - seen) == 1, change  # one new stage file
        seen = now
    other_shadow = copy.deepcopy(shadow)
    with torch.no_grad():
        next(other_shadow.parameters()).add_(0.01)
    now = run(ctx, advface(net=other_shadow))
    assert len(now - seen) == 1
    seen = now
    with torch.no_grad():  # a head weight: not in E, so only FaceNet's fingerprint sees it
        facenet.last_linear.weight.add_(0.01)
    ctx2 = _context(tmp_path, facenet)
    assert ctx2.weights_sha != ctx.weights_sha
    now = run(ctx2, advface(c=ctx2))
    assert len(now - seen) == 1
    random = build_protection("random", steps=2, bound=0.1, reading="projected", epsilon=0.1)
    seen = run(ctx2, random)
    wider = build_protection("random", steps=2, bound=0.1, reading="projected", epsilon=0.2)
    assert len(run(ctx2, wider) - seen) == 1


def test_interrupted_training_resumes_and_budget_counts_spent_time(
    tmp_path, random_facenet, monkeypatch
):
    import numpy as np

    import advface.attacks.train as train_mod
    from advface.data.splits import IdentitySplit
    from advface.pipelines import decoders
    from advface.pipelines.decoders import spent_minutes
    from advface.pipelines.reproduce import networks

    ctx = _context(tmp_path, random_facenet, epochs=2, train_batch=4)
    keys = [f"P{i}/P{i}_0001.jpg" for i in range(8)]
    images = (np.random.default_rng(0).random((8, 160, 160, 3)) * 255).astype(np.uint8)
    monkeypatch.setattr(ctx, "images", lambda dataset, k: images[: len(k)])
    monkeypatch.setattr(ctx, "count_fallbacks", lambda *a: None)
    # Made-up faces: their "source files" are the arrays.
    monkeypatch.setattr(
        decoders, "source_fingerprint", lambda d, k, data_root=None: str(hash(images.tobytes()))
    )
    split = IdentitySplit("t", "lfw", keys, [f"p{i}" for i in range(8)])
    real = train_mod.train_recon

    def killed_after_one_epoch(*args, settings, **kw):
        settings.epochs = 1  # the checkpoint of epoch 1 is written, then the process dies
        real(*args, settings=settings, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_recon", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        networks.train_model(ctx, "attacker-resrec", "resrec", split, identity={"overlap": 0})
    monkeypatch.setattr(train_mod, "train_recon", real)
    _, key = networks.train_model(ctx, "attacker-resrec", "resrec", split, identity={"overlap": 0})
    rec = ctx.training["attacker-resrec"]
    assert rec["epochs"] == 2 and len(rec["loss_curve"]) == 2
    first = json.loads((ctx.stages.root / key / "config.json").read_text())
    assert first["done"] and first["history"][0]["epoch"] == 1
    # Loaded, not retrained, while its faces stay; one image changed under its name retrains.
    _, again = networks.train_model(ctx, "attacker-resrec", "resrec", split, identity={})
    assert again == key
    images[3, 0, 0] ^= 1
    _, changed = networks.train_model(ctx, "attacker-resrec", "resrec", split, identity={})
    assert changed != key and (ctx.stages.root / changed / "config.json").exists()
    # A time budget counts the minutes of the complete epochs already in the checkpoint.
    hist = [{"epoch": 1, "seconds": 60.0}, {"epoch": 2, "seconds": 30.0}]
    assert spent_minutes({"epochs": 1, "history": hist}) == 1.0
    assert spent_minutes({"epochs": 2, "history": hist}) == 1.5
    # Checkpoints that record the budget clock count it instead of wall time.
    hist = [{"epoch": 1, "seconds": 600.0, "budget_seconds": 60.0}]
    assert spent_minutes({"epochs": 1, "history": hist}) == 1.0


def test_protected_training_features_resume_from_cached_chunks(
    tmp_path, random_facenet, monkeypatch
):
    """An adaptive attacker's features are filled in cached chunks: a fill interrupted in its
    second chunk computes only that chunk again, and the chunks go once the decoder trained."""
    import numpy as np
    import torch

    from advface.attacks.train import MemoFeatures, to_unit
    from advface.data.splits import IdentitySplit
    from advface.models.facenet import unit_to_facenet
    from advface.pipelines import decoders
    from advface.pipelines.context import TRAIN_CODE

    ctx = _context(tmp_path, random_facenet, epochs=1, train_batch=4)  # chunks of 4, batches of 2
    images = (np.random.default_rng(1).random((8, 160, 160, 3)) * 255).astype(np.uint8)
    monkeypatch.setattr(
        decoders, "source_fingerprint", lambda d, k, data_root=None: str(hash(images.tobytes()))
    )
    split = IdentitySplit("t", "lfw", [f"P{i}/P{i}_0001.jpg" for i in range(8)], list("abcdefgh"))
    calls: list[int] = []

    def protect(z: torch.Tensor) -> torch.Tensor:
        calls.append(len(z))
        if len(calls) == 5:  # the first batch of the second chunk: the process dies
            raise KeyboardInterrupt
        return z * 0.5

    def train(memo: MemoFeatures):
        return decoders.train_cached(
            ctx, "adaptive-t", "resrec", split, lambda: images, features="t", feature_fn=memo,
            depends={}, code=TRAIN_CODE, epochs=1, flip=True, meta={},
        )  # fmt: skip

    with pytest.raises(KeyboardInterrupt):
        train(MemoFeatures(protect))
    assert calls == [2, 2, 2, 2, 2]  # chunk 1: images 0-3 and their mirrors, then chunk 2 died
    assert len(list(ctx.stages.root.glob("features-adaptive-t-*"))) == 1
    calls.clear()
    memo = MemoFeatures(protect)
    train(memo)
    assert calls == [2, 2, 2, 2] and len(memo) == 16  # only chunk 2 computed again
    x = to_unit(images[1:2]).flip(-1)
    with torch.no_grad():
        want = ctx.encoder(unit_to_facenet(x)) * 0.5
    got = memo.lookup([(1, True)], lambda rows: pytest.fail("should be held"))
    assert torch.allclose(got, want, atol=1e-2)  # restored from chunk 1's file
    assert not list(ctx.stages.root.glob("features-adaptive-t-*"))  # trained: chunks removed
    with pytest.raises(ValueError, match="2 feature rows for 1 keys"):
        memo.put([(0, False)], torch.zeros(2, 3))


@pytest.mark.data
def test_attack_and_reproduce_measure_the_same(data_root, tmp_path):
    """`advface attack` and `advface reproduce` give the same numbers for the same
    reconstructions (one evaluation function)."""
    import numpy as np
    import torch

    from advface.data.splits import lfw_test_split
    from advface.models.facenet import load_facenet
    from advface.models.recon import build_recon, save_checkpoint
    from advface.pipelines.attack import run_attack, select_keys
    from advface.pipelines.recon_eval import clean_embeddings
    from advface.pipelines.reproduce.evaluate import TestFaces, recon_stage, recon_values
    from advface.protection import build_protection

    torch.manual_seed(0)
    net = build_recon("resrec", width=4, blocks=1).eval()
    save_checkpoint(tmp_path / "ck", net, "resrec", {"width": 4, "blocks": 1},
                    train_set="lfw-attacker", epochs=0, seed=0, features="clean")  # fmt: skip
    thresholds = {"operating": 0.2, "far_1e-3": 0.4}
    n, bs = 6, 3
    att = run_attack(tmp_path / "ck", "lfw", limit=n, data_root=data_root, batch_size=bs,
                     thresholds=thresholds, grid=False, progress=False)  # fmt: skip
    ctx = _context(tmp_path, load_facenet(), data_root, protect_batch=bs, chunk=n)
    keys = select_keys(lfw_test_split(data_root).keys, n, 0)
    images = ctx.images("lfw", keys)
    faces = TestFaces("lfw", keys, images, clean_embeddings(ctx.facenet, images))
    res = recon_stage(ctx, faces, "none", build_protection("none"), {"resrec": net},
                      {"resrec": "k"}, {"resrec"})  # fmt: skip

    class Ev:  # the dataset evaluation, reduced to what recon_values reads
        pass

    ev = Ev()
    ev.faces, ev.thresholds = faces, thresholds
    ours = recon_values(res, "resrec", ev)
    ours = {**ours, **ours.pop("extra")}
    assert att["n_images"] == ours["n_images"] == n
    for k in ("ssim", "psnr", "mse", "srra", "srra_far_1e-3", "replay_cosine"):
        assert np.isclose(att[k], ours[k], rtol=1e-5, atol=1e-6), k


def test_measured_record_round_trips_values_and_grids():
    import numpy as np

    from advface.pipelines.reproduce.evaluate import Measured

    # Smooth faces, as reconstructions are: colour ramps.
    y, x = np.mgrid[0:160, 0:160].astype(np.float32) / 160
    faces = [np.stack([y * 80 * (i + 1), np.full_like(x, 40.0 * i), 255 - x * 200], -1)
             for i in range(3)]  # fmt: skip
    grid = np.stack(faces).clip(0, 255).astype(np.uint8)
    rec = Measured(
        recon={"resrec": {"ssim": np.float32(0.5), "ssim_ci95": (0.4, 0.6), "extra": {"n": 3}}},
        accuracy={"psi": {"accuracy": np.float64(0.9), "extra": {}}},
        grids={"resrec": grid},
    )
    data = json.loads(json.dumps(rec.to_json()))  # what the cache file holds
    back = Measured.from_json(data)
    assert back.recon == {"resrec": {"ssim": 0.5, "ssim_ci95": [0.4, 0.6], "extra": {"n": 3}}}
    got = back.grids["resrec"]  # JPEG: for display, close to the reconstructions
    assert got.shape == grid.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - grid).mean() < 2
    vals = back.accuracy_values()
    vals["extra"]["mode"] = "online"  # a table adding to its row does not touch the record
    assert back.accuracy_values() == {"accuracy": 0.9, "extra": {}}
