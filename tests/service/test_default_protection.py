"""Protected by default: embedding-shadow unless told otherwise; none needs a loud flag."""

import pytest

from advface.service.core import public_params
from advface.service.settings import ServiceSettings


def test_default_protection_is_embedding_shadow_for_facenet():
    assert ServiceSettings(backend="facenet").protection == "embedding-shadow"
    assert ServiceSettings(backend="toy").protection == "none"  # the test stand-in
    assert ServiceSettings.from_env({"ADVFACE_BACKEND": "facenet"}).protection == (
        "embedding-shadow"
    )


def test_unprotected_facenet_service_needs_the_explicit_flag():
    with pytest.raises(ValueError, match="--allow-unprotected"):
        ServiceSettings(backend="facenet", protection="none")
    ok = ServiceSettings(backend="facenet", protection="none", allow_unprotected=1)
    assert ok.protection == "none"
    env = {"ADVFACE_PROTECTION": "none", "ADVFACE_ALLOW_UNPROTECTED": "1"}
    assert ServiceSettings.from_env(env).allow_unprotected == 1
    with pytest.raises(ValueError, match="allow_unprotected"):
        ServiceSettings(backend="facenet", allow_unprotected=2)


def test_tenants_see_no_paths_or_training_details():
    class Prot:
        name = "advface"

        def params(self):
            return {
                "name": "advface",
                "steps": 40,
                "shadow_sha256": "ab",
                "shadow_path": "/srv/models/s",
                "shadow_config": {"train_set": "x"},
            }

    assert public_params(Prot()) == {"name": "advface", "steps": 40, "shadow_sha256": "ab"}


def test_serve_refuses_unprotected_facenet_without_the_flag(tmp_path):
    from typer.testing import CliRunner

    from advface.cli import app

    r = CliRunner().invoke(
        app, ["serve", "--db-url", f"sqlite:///{tmp_path}/x.db", "--protection", "none"]
    )
    assert r.exit_code == 2 and "allow-unprotected" in r.output
