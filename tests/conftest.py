"""Shared fixtures: real-data tests run only when ADVFACE_DATA_ROOT points at the datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _data_root() -> Path | None:
    value = os.environ.get("ADVFACE_DATA_ROOT")
    if value and Path(value).is_dir():
        return Path(value)
    return None


def pytest_collection_modifyitems(config, items):
    if _data_root() is not None:
        return
    skip = pytest.mark.skip(reason="ADVFACE_DATA_ROOT is not set to the datasets")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None:
        pytest.skip("ADVFACE_DATA_ROOT is not set to the datasets")
    return root


@pytest.fixture
def one_thread():
    """One torch thread: on a shared or small CPU, OpenMP threads spinning against other
    processes make a forward pass several times slower than one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def random_facenet():
    """An untrained FaceNet with non-trivial batch-norm statistics and biases, so that loading,
    saving and splitting them is really exercised."""
    import torch

    from advface.models.facenet import InceptionResnetV1

    torch.manual_seed(0)
    net = InceptionResnetV1().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return net
