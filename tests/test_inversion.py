import numpy as np
import pytest
import torch
from torch import nn

from advface.attacks.inversion import (
    EmbeddingAttack,
    FeatureInversion,
    InversionSettings,
    MeanFace,
    total_variation,
)


def test_total_variation_is_zero_on_flat_images():
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(total_variation(flat), torch.zeros(2))
    noisy = torch.rand(2, 3, 8, 8)
    assert (total_variation(noisy) > 0.1).all()


def test_inversion_recovers_an_image_from_its_features():
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU())
    target = torch.rand(2, 3, 160, 160) * 0.5 + 0.25
    with torch.no_grad():
        z = extractor((target * 255 - 127.5) / 128)
    few = FeatureInversion(extractor, settings=InversionSettings(steps=2, id_weight=0.0))
    many = FeatureInversion(
        extractor, settings=InversionSettings(steps=150, tv_weight=0.0, id_weight=0.0)
    )
    err_few = (few(z) - target).abs().mean()
    err_many = (many(z) - target).abs().mean()
    assert err_many < 0.8 * err_few
    assert many(z).min() >= 0 and many(z).max() <= 1


def test_inversion_settings_are_validated():
    with pytest.raises(ValueError, match="steps"):
        InversionSettings(steps=0)
    with pytest.raises(ValueError, match="tv_weight"):
        InversionSettings(tv_weight=-1.0)
    with pytest.raises(ValueError, match="head"):
        FeatureInversion(nn.Identity(), None, InversionSettings(id_weight=0.5))
    with pytest.raises(ValueError, match="init"):
        FeatureInversion(nn.Identity(), None, InversionSettings(id_weight=0), torch.zeros(3, 4, 4))


@pytest.mark.parametrize(
    ("z", "message"),
    [
        (torch.zeros(16, 79, 79), "4-D"),
        (torch.zeros(0, 16, 79, 79), "N >= 1"),
        (torch.zeros(1, 16, 79, 79, dtype=torch.int64), "floating"),
        (torch.full((1, 16, 79, 79), float("nan")), "finite"),
    ],
)
def test_inversion_refuses_malformed_features(z, message):
    inv = FeatureInversion(nn.Identity(), None, InversionSettings(steps=1, id_weight=0.0))
    with pytest.raises(ValueError, match=message):
        inv(z)


def test_from_embedding_refuses_malformed_embeddings():
    head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 160 * 160, 4))
    inv = FeatureInversion(
        nn.Identity(), head, InversionSettings(steps=1, feature_weight=0.0, id_weight=1.0)
    )
    for bad, message in ((torch.zeros(4), "2-D"), (torch.full((1, 4), float("inf")), "finite")):
        with pytest.raises(ValueError, match=message):
            inv.from_embedding(bad)


def test_mean_face_ignores_its_input():
    images = np.stack([np.full((160, 160, 3), v, np.uint8) for v in (0, 100, 200)])
    floor = MeanFace.from_images(images)
    out = floor(torch.randn(4, 64, 77, 77))
    assert out.shape == (4, 3, 160, 160)
    assert torch.allclose(out, torch.full_like(out, 100 / 255), atol=1e-6)
    with pytest.raises(ValueError):
        MeanFace.from_images(images.astype(np.float32))


def test_embedding_attack_decodes_what_psi_reads():
    head = nn.Sequential(nn.Flatten(), nn.Linear(4, 512))
    decoder = nn.Sequential(nn.Linear(512, 3 * 160 * 160), nn.Unflatten(1, (3, 160, 160)))
    z = torch.randn(2, 1, 2, 2)
    out = EmbeddingAttack(decoder, head)(z)
    assert torch.allclose(out, decoder(head(z)))


def test_embedding_inversion_sees_only_the_embedding():
    from advface.attacks.inversion import EmbeddingInversion

    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 8))
    target = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        z = extractor((target * 255 - 127.5) / 128)
    settings = InversionSettings(steps=60, feature_weight=0.0, id_weight=1.0, tv_weight=0.0)
    attack = EmbeddingInversion(FeatureInversion(extractor, head, settings))
    out = attack(z)
    with torch.no_grad():
        got = head(extractor((out * 255 - 127.5) / 128))
        cos = torch.nn.functional.cosine_similarity(got, head(z))
    assert (cos > 0.9).all()
    # The same result from the embedding alone: the feature map itself is never used.
    again = attack.inv.from_embedding(head(z))
    assert torch.allclose(out, again, atol=1e-5)
    with pytest.raises(ValueError, match="both be 0"):
        InversionSettings(feature_weight=0.0, id_weight=0.0)
    with pytest.raises(ValueError, match="feature_weight=0"):
        EmbeddingInversion(FeatureInversion(extractor, head, InversionSettings()))
