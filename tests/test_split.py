"""Client extractor E / server part Psi split of FaceNet."""

from __future__ import annotations

import pytest
import torch

from advface.models.facenet import STAGE_NAMES, InceptionResnetV1
from advface.models.split import split_facenet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(random_facenet) -> InceptionResnetV1:
    return random_facenet


def test_default_split_matches_paper(model: InceptionResnetV1) -> None:
    extractor, head = split_facenet(model)
    assert list(dict(extractor.named_children())) == ["conv2d_1a", "conv2d_2a", "conv2d_2b"]
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        z = extractor(x)
        emb = head(z)
        full = model(x)
    assert z.shape == (1, 64, 77, 77)
    assert emb.shape == (1, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1))
    assert torch.equal(emb, full)


def test_every_split_point_is_exact(model: InceptionResnetV1) -> None:
    # 80x80 is the smallest convenient input (Mixed_7a leaves 1x1); 4x cheaper than 160.
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        for at in STAGE_NAMES:
            extractor, head = split_facenet(model, at=at)
            assert len(extractor) == STAGE_NAMES.index(at) + 1
            assert torch.equal(head(extractor(x)), full), at


def test_unknown_split_point_lists_valid_names(model: InceptionResnetV1) -> None:
    with pytest.raises(ValueError, match="conv2d_2b") as info:
        split_facenet(model, at="conv2d_9z")
    assert all(name in str(info.value) for name in STAGE_NAMES)


def test_rejects_other_models() -> None:
    with pytest.raises(ValueError, match="InceptionResnetV1"):
        split_facenet(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_parts_share_the_model_parameters(model: InceptionResnetV1) -> None:
    extractor, head = split_facenet(model)
    model_ids = {id(p) for p in model.parameters()}
    part_ids = [id(p) for p in extractor.parameters()] + [id(p) for p in head.parameters()]
    assert sorted(part_ids) == sorted(model_ids)  # every parameter, each in one part
    assert extractor.conv2d_1a is model.conv2d_1a
    assert set(extractor.state_dict()) <= set(model.state_dict())
    assert not extractor.training and not head.training


def test_gradient_reaches_features(model: InceptionResnetV1) -> None:
    """Attacks and protections differentiate Psi with respect to the features z."""
    extractor, head = split_facenet(model)
    with torch.no_grad():
        z = extractor(torch.randn(1, 3, 80, 80))
    z.requires_grad_(True)
    head(z).sum().backward()
    assert z.grad is not None and z.grad.shape == z.shape
    assert torch.isfinite(z.grad).all()
