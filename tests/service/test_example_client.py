"""examples/service_client.py against the in-process service (toy networks, real faces)."""

from __future__ import annotations

from pathlib import Path

import pytest

from advface.service.backend import Backend

from .conftest import Harness, sdk_client

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "service_client.py"


@pytest.mark.data
def test_service_client_example(harness: Harness, toy: Backend, data_root: Path) -> None:
    import runpy

    folder = data_root / "lfw" / "lfw-deepfunneled" / "Aaron_Peirsol"
    images = [str(folder / f"Aaron_Peirsol_{i:04d}.jpg") for i in (1, 2, 3)]
    main = runpy.run_path(str(EXAMPLE))["main"]  # not as __main__: only defines main
    out = main(["aaron", *images], client=sdk_client(harness, toy))
    assert out["templates"] == 2 and out["deleted"] == 2 and isinstance(out["match"], bool)
    assert out["top"] == "aaron"  # the only subject enrolled
    assert harness.state() == (0, 0)  # deleted again
