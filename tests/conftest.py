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
