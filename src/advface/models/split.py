"""Split FaceNet into the client feature extractor E and the server part Psi (paper Sec. 3.1).

E and Psi share their modules (and parameters) with the model they were cut from: no copies,
so ``Psi(E(x))`` runs exactly the same operations as ``model(x)`` and is bitwise equal to it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from advface.models.facenet import STAGE_NAMES, InceptionResnetV1, embedding_head

__all__ = ["DEFAULT_SPLIT", "FeatureExtractor", "ServerHead", "split_facenet"]

DEFAULT_SPLIT = "conv2d_2b"


class FeatureExtractor(nn.Sequential):
    """Client part E: the stages of the network up to and including the split point.

    Its state dict keys are the model's own (``conv2d_1a.conv.weight`` ...).
    """


class ServerHead(nn.Module):
    """Server part Psi: the remaining stages, then the embedding head -> (N,512), unit norm."""

    def __init__(self, model: InceptionResnetV1, stage_names: list[str]) -> None:
        super().__init__()
        self.stages = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in stage_names))
        self.dropout = model.dropout
        self.last_linear = model.last_linear
        self.last_bn = model.last_bn

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # The model's own head function, so the result is bitwise identical to model(x).
        return embedding_head(self.stages(z), self.dropout, self.last_linear, self.last_bn)


def split_facenet(
    model: InceptionResnetV1, at: str = DEFAULT_SPLIT
) -> tuple[FeatureExtractor, ServerHead]:
    """Cut ``model`` after the top-level stage ``at`` into (E, Psi).

    Default ``at="conv2d_2b"``: E = conv2d_1a, conv2d_2a, conv2d_2b, mapping (N,3,160,160) to
    (N,64,77,77); Psi = the rest, to the 512-d L2-normalised embedding. Valid split points are
    :data:`advface.models.facenet.STAGE_NAMES`. E and Psi share the model's parameters and
    take its train/eval mode.
    """
    if not isinstance(model, InceptionResnetV1):
        raise ValueError(f"split_facenet expects an InceptionResnetV1, got {type(model).__name__}")
    if at not in STAGE_NAMES:
        raise ValueError(f"unknown split point {at!r}; valid layer names: {', '.join(STAGE_NAMES)}")
    cut = STAGE_NAMES.index(at) + 1
    extractor = FeatureExtractor(OrderedDict((n, getattr(model, n)) for n in STAGE_NAMES[:cut]))
    head = ServerHead(model, list(STAGE_NAMES[cut:]))
    extractor.train(model.training)
    head.train(model.training)
    return extractor, head
