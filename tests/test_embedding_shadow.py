import pytest
import torch
from torch import nn

from advface.models.recon import build_recon
from advface.protection import build_protection, parse_spec
from advface.protection.embedding_shadow import EmbeddingShadow

C, H = 4, 9  # toy feature maps (C, H, H) from 3x19x19 images


class ToyE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x))


class ToyPsi(nn.Module):
    """Global average pooling + linear: permuting spatial positions keeps the embedding."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, 6)

    def forward(self, z):
        return nn.functional.normalize(self.fc(z.mean((2, 3))), dim=1)


class ToyD(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3 * 19 * 19)

    def forward(self, e):
        return torch.sigmoid(self.fc(e)).view(-1, 3, 19, 19)


class ToyS(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.out = nn.ConvTranspose2d(8, 3, 3, stride=2)

    def forward(self, z):
        return torch.sigmoid(self.out(self.net(z)))


@pytest.fixture
def nets():
    torch.manual_seed(0)
    return {"generator": ToyD(), "shadow": ToyS(), "extractor": ToyE(), "head": ToyPsi()}


def _prot(nets, **kw):
    settings = {"steps": 3, "alpha": 0.05, "epsilon": 0.2, **kw}
    return EmbeddingShadow(expected_shape=(C, H, H), **nets, **settings)


def test_same_embedding_gives_the_same_protected_feature(nets):
    """The stored feature is a function of Psi(z) and the randomness only: two different maps
    with the same embedding (here: spatially permuted, which the pooling head cannot see)
    give identical outputs for the same random draw."""
    z1 = torch.rand(3, C, H, H)
    z2 = z1.flip(-1).flip(-2)
    head = nets["head"]
    assert not torch.equal(z1, z2)
    assert torch.allclose(head(z1), head(z2), atol=1e-6)
    prot = _prot(nets)
    out1 = prot.protect(z1, generator=torch.Generator().manual_seed(7))
    out2 = prot.protect(z2, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(out1, out2, atol=1e-5)
    core = prot.protect_embedding(head(z1), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(core, out1, atol=1e-5)
    # Fresh randomness: another draw, another stored feature (unlinkable templates).
    out3 = prot.protect(z1, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(out1, out3)


def test_output_stays_within_epsilon_of_the_generated_feature(nets):
    from advface.protection.advface import facenet_standardize

    prot = _prot(nets, epsilon=0.1)
    z = torch.rand(2, C, H, H)
    out = prot.protect(z, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = nets["extractor"](facenet_standardize(nets["generator"](nets["head"](z))))
    assert (out - start).abs().max() <= 0.1 + 1e-6
    assert out.shape == z.shape and out.dtype == z.dtype


def test_identity_term_keeps_the_embedding_closer(nets):
    z = torch.rand(8, C, H, H)
    e = nets["head"](z)

    def cos(weight):
        prot = EmbeddingShadow(
            expected_shape=(C, H, H),
            steps=20,
            alpha=0.02,
            epsilon=0.5,
            identity_weight=weight,
            random_start=False,
            **nets,
        )
        out = prot.protect(z)
        with torch.no_grad():
            return float((nets["head"](out) * e).sum(1).mean())

    assert cos(10.0) > cos(0.0)


def test_identity_every_reuses_the_identity_direction(nets):
    """identity_every=k runs Psi's backward on every k-th step only; k=1 is the full method."""
    calls = []

    class CountingPsi(nn.Module):
        def __init__(self, psi):
            super().__init__()
            self.psi = psi

        def forward(self, z):
            calls.append(len(z))
            return self.psi(z)

    z = torch.rand(2, C, H, H)
    counted = {**nets, "head": CountingPsi(nets["head"])}
    outs = {}
    for k in (1, 3):
        calls.clear()
        prot = _prot(counted, steps=6, identity_every=k, random_start=False)
        outs[k] = prot.protect(z)
        # One Psi forward reads e from z, then one per identity gradient: 6 steps -> 6 or 2.
        assert len(calls) == 1 + 6 // k
        assert prot.params().get("identity_every", 1) == k
    assert not torch.equal(outs[1], outs[3])
    with pytest.raises(ValueError, match="identity_every"):
        _prot(nets, identity_every=0)


def test_validation_and_registry(nets, tmp_path):
    with pytest.raises(ValueError, match="steps"):
        _prot(nets, steps=-1)
    with pytest.raises(ValueError, match="identity_weight"):
        _prot(nets, identity_weight=float("nan"))
    with pytest.raises(ValueError, match="both extractor and head"):
        EmbeddingShadow(nets["generator"], nets["shadow"], extractor=nets["extractor"])
    with pytest.raises(ValueError, match="generator must be"):
        EmbeddingShadow(42, nets["shadow"], extractor=nets["extractor"], head=nets["head"])
    prot = _prot(nets)
    with pytest.raises(ValueError, match="finite"):
        prot.protect(torch.full((1, C, H, H), float("nan")))
    with pytest.raises(ValueError, match="embeddings"):
        prot.protect_embedding(torch.zeros(3))
    with pytest.raises(ValueError, match="at least one sample"):
        prot.protect_embedding(torch.zeros(0, 6))
    with pytest.raises(ValueError, match="6-d"):
        prot.protect_embedding(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="generator must be"):
        prot.protect_embedding(torch.zeros(2, 6), generator=7)
    # An EmbDec generator states its width (input_shape); refused before anything runs.
    prot.generator = build_recon("embdec", width=2, dim=9)
    with pytest.raises(ValueError, match="9-d"):
        prot.protect_embedding(torch.zeros(2, 6))
    params = prot.params()
    assert params["name"] == "embedding-shadow"
    assert {"generator_sha256", "shadow_sha256", "head_sha256", "identity_weight"} <= set(params)
    built = build_protection("embedding-shadow", expected_shape=(C, H, H), **nets)
    assert isinstance(built, EmbeddingShadow)
    name, spec = parse_spec("embedding-shadow,generator=g,shadow=s,steps=5")
    assert name == "embedding-shadow" and spec == {"generator": "g", "shadow": "s", "steps": 5}
    with pytest.raises(ValueError, match="generator=CKPT"):
        parse_spec("embedding-shadow,shadow=s")


def test_random_projected_reading_respects_the_budget():
    z = torch.zeros(2, 64, 77, 77)
    legacy = build_protection("random", seed=0, distribution="sign").protect(z)
    proj = build_protection("random", seed=0, distribution="sign", reading="projected", epsilon=0.2)
    out = proj.protect(z)
    assert legacy.abs().max() > 0.2 + 1e-6  # 40 accumulated steps of 0.2
    assert out.abs().max() <= 0.2 + 1e-6
    assert proj.params()["reading"] == "projected"
    with pytest.raises(ValueError, match="reading"):
        build_protection("random", reading="sideways")


def test_protect_options_build_embedding_shadow_from_checkpoints(tmp_path, random_facenet):
    from advface.models.recon import build_recon, save_checkpoint
    from advface.models.split import split_facenet
    from advface.pipelines.protect import build_from_options

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "gen", build_recon("embdec", width=2), "embdec", {"width": 2})
    save_checkpoint(
        tmp_path / "s",
        build_recon("resrec", width=2, blocks=0),
        "resrec",
        {"width": 2, "blocks": 0},
    )
    enc, head = split_facenet(random_facenet)
    prot = build_from_options(
        "embedding-shadow",
        shadow=tmp_path / "s",
        generator=tmp_path / "gen",
        steps=1,
        extractor=enc,
        head=head,
    )
    out = prot.protect(torch.rand(1, 64, 77, 77))
    assert out.shape == (1, 64, 77, 77) and torch.isfinite(out).all()
    assert prot.params()["generator_path"].endswith("gen")
    with pytest.raises(ValueError, match="--generator"):
        build_from_options("embedding-shadow", shadow=tmp_path / "s", extractor=enc, head=head)
    with pytest.raises(ValueError, match="--generator"):
        build_from_options("advface", shadow=tmp_path / "s", generator=tmp_path / "gen")


def test_missing_packaged_networks_are_named(monkeypatch, tmp_path, nets):
    monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="advface train-protection"):
        EmbeddingShadow(extractor=nets["extractor"], head=nets["head"])


@pytest.mark.data
def test_train_protection_writes_a_usable_manifested_folder(data_root, tmp_path):
    import json

    from advface.pipelines.default_weights import train_default_protection

    out = tmp_path / "es"
    manifest = train_default_protection(out, epochs=1, limit=24, check_faces=2, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["train_set"].startswith("celeba-server") and manifest["images"] == 24
    for role in ("generator", "shadow"):
        assert (out / role / "model.safetensors").is_file()
    assert -1 <= manifest["check"]["identity_cosine_mean"] <= 1
    built = build_protection("embedding-shadow", generator=out / "generator", shadow=out / "shadow")
    assert built.params()["generator_sha256"]
    with pytest.raises(FileExistsError):
        train_default_protection(out, epochs=1, limit=24, progress=False)
