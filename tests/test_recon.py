"""Reconstruction networks: shapes, range, registry validation, FLOPs, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from advface.models.recon import (
    ARCHITECTURES,
    build_recon,
    estimate_flops,
    load_checkpoint,
    read_config,
    save_checkpoint,
)

SMALL = {"transrec": {"width": 8}, "resrec": {"width": 8, "blocks": 1}, "urec": {"width": 8}}
#: Decoders of E's feature maps (EmbDec decodes embeddings: its own test below).
FEATURE_DECODERS = sorted(a for a in ARCHITECTURES if a != "embdec")


def test_embdec_decodes_embeddings() -> None:
    torch.manual_seed(0)
    model = build_recon("embdec", width=2).eval()
    with torch.no_grad():
        y = model(torch.randn(3, 512))
    assert y.shape == (3, 3, 160, 160) and float(y.min()) >= 0 and float(y.max()) <= 1
    with pytest.raises(ValueError, match="embeddings"):
        model(torch.randn(2, 64, 77, 77))
    assert estimate_flops(build_recon("embdec", width=16)) < estimate_flops(
        build_recon("embdec", width=64)
    )


@pytest.mark.parametrize("arch", FEATURE_DECODERS)
def test_shape_and_range(arch: str) -> None:
    torch.manual_seed(0)
    model = build_recon(arch, **SMALL[arch])
    with torch.no_grad():
        y = model(torch.randn(2, 64, 77, 77) * 3)
    assert y.shape == (2, 3, 160, 160)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_default_depth_variants() -> None:
    assert build_recon("transrec", width=4, depth=2)(torch.randn(2, 64, 77, 77)).shape[1:] == (
        3,
        160,
        160,
    )
    assert build_recon("urec", width=4, levels=3)(torch.randn(2, 64, 77, 77)).shape[-1] == 160


@pytest.mark.parametrize(
    "arch,cfg",
    [
        ("nope", {}),
        ("resrec", {"width": 0}),
        ("resrec", {"blocks": -1}),
        ("resrec", {"width": 2.5}),
        ("resrec", {"width": True}),
        ("resrec", {"levels": 2}),
        ("urec", {"levels": 0}),
        ("transrec", {"blocks": 1}),
    ],
)
def test_registry_rejects_bad_parameters(arch: str, cfg: dict) -> None:
    with pytest.raises(ValueError):
        build_recon(arch, **cfg)


def test_wrong_input_shape() -> None:
    with pytest.raises(ValueError):
        build_recon("transrec", width=4)(torch.randn(2, 32, 77, 77))


def test_flops_scale_with_width() -> None:
    small = estimate_flops(build_recon("resrec", width=8, blocks=2))
    big = estimate_flops(build_recon("resrec", width=16, blocks=2))
    assert 0 < small < big
    # Exact count for the mirror: 3 transposed convs + the RGB projection.
    w = 4
    expected = 2 * (
        77 * 77 * 64 * w * 9 + 77 * 77 * w * w * 9 + 79 * 79 * w * w * 9 + 160 * 160 * w * 3 * 9
    )
    assert estimate_flops(build_recon("transrec", width=w)) == expected


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    model = build_recon("resrec", width=8, blocks=1)
    model.train()
    model(torch.randn(4, 64, 77, 77))  # move BN running stats away from their init
    save_checkpoint(
        tmp_path / "ck",
        model,
        "resrec",
        {"width": 8, "blocks": 1},
        train_set="celeba",
        epochs=3,
        seed=7,
        features="clean",
    )
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["arch"] == "resrec" and cfg["cfg"] == {"width": 8, "blocks": 1}
    assert cfg["train_set"] == "celeba" and cfg["epochs"] == 3 and cfg["features"] == "clean"
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta["seed"] == 7 and not loaded.training
    z = torch.randn(2, 64, 77, 77)
    model.eval()
    assert torch.equal(model(z), loaded(z))
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError):
        read_config(tmp_path)
    model = build_recon("transrec", width=4)
    with pytest.raises(TypeError):  # not JSON-serialisable: nothing is written
        save_checkpoint(tmp_path / "x", model, "transrec", {"width": 4}, bad=object())
    assert not (tmp_path / "x" / "model.safetensors").exists()


def _saved(tmp_path, width: int = 4):
    ck = tmp_path / "ck"
    save_checkpoint(ck, build_recon("transrec", width=width), "transrec", {"width": width})
    return ck


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda ck: (ck / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda ck: (ck / "config.json").write_bytes(b"\xff\xfe{}"), "not valid JSON"),
        (
            lambda ck: (ck / "config.json").write_text(json.dumps({"arch": "transrec", "cfg": 4})),
            "needs arch and cfg",
        ),
        (
            lambda ck: (ck / "config.json").write_text(
                json.dumps({"arch": "transrec", "cfg": {"width": "wide"}})
            ),
            "cannot build",
        ),
        (
            lambda ck: (ck / "model.safetensors").write_bytes(
                (ck / "model.safetensors").read_bytes()[:100]
            ),
            "not a readable safetensors",
        ),
        (
            lambda ck: (ck / "config.json").write_text(
                json.dumps({"arch": "transrec", "cfg": {"width": 8}})
            ),
            "does not fit",
        ),
    ],
)
def test_damaged_checkpoints_are_value_errors(tmp_path, damage, message) -> None:
    ck = _saved(tmp_path)
    damage(ck)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(ck)


def test_profiles() -> None:
    from advface.models.recon import PROFILES, profile_config, recon_params

    for arch in ARCHITECTURES:
        # Defaults = CPU profile (EmbDec's input size is not a profile setting).
        assert profile_config(arch, "cpu").items() <= recon_params(arch).items()
        cpu = estimate_flops(build_recon(arch, **profile_config(arch, "cpu")))
        gpu = estimate_flops(build_recon(arch, **profile_config(arch, "gpu")))
        assert cpu < gpu
    assert set(PROFILES) == {"cpu", "gpu"}
    with pytest.raises(ValueError):
        profile_config("resrec", "tpu")
