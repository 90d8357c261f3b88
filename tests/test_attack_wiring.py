"""The attack pipeline accepts the protection specs of advface.protection.spec."""

import pytest
import torch

from advface.pipelines.attack import resolve_protection


def test_none_means_no_protection():
    assert resolve_protection("none") is None and resolve_protection("clean") is None


def test_spec_with_parameters_builds_the_protection():
    fn = resolve_protection("random,steps=2,seed=3")
    z = torch.rand(2, 64, 77, 77)
    out = fn(z)
    assert out.shape == z.shape and not torch.equal(out, z)
    assert torch.equal(out, resolve_protection("random,steps=2,seed=3")(z))  # seeded


def test_advface_spec_with_missing_shadow_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_protection(f"advface:{tmp_path / 'nope'}")
