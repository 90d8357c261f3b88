"""Imports flow one way: CLI -> pipelines and service -> attacks and protection -> models,
data and metrics -> config; a module never imports from a layer above its own, nor from a
sibling package of its layer (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import advface

ROOT = Path(advface.__file__).parent
# Package (first name under advface) -> layer; a module may import only from lower layers.
LAYER = {
    "config": 0,
    "fileio": 0,
    "checks": 0,
    "": 0,  # advface/__init__.py: the version
    "models": 1,
    "data": 1,
    "metrics": 1,
    "attacks": 2,
    "protection": 2,
    "pipelines": 3,
    "service": 3,
    "cli": 4,
    "__main__": 5,  # python -m advface: the CLI
}


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path, source: str | None = None) -> set[str]:
    """Names under ``advface`` that ``path`` (or ``source`` as if it were at ``path``)
    imports, as dotted names below ``advface``."""
    here = _module(path)
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            names = ["advface." + ".".join(base + ([node.module] if node.module else []))]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        ours = [n for n in names if n.split(".")[0] == "advface"]
        out |= {n.removeprefix("advface").lstrip(".") for n in ours}
    return out


def _package(dotted: str) -> str:
    return dotted.split(".")[0].strip()


def test_every_package_has_a_layer() -> None:
    packages = {_package(".".join(_module(p))) for p in ROOT.rglob("*.py")}
    assert packages <= set(LAYER), packages - set(LAYER)


def test_imports_flow_one_way() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        own = _package(".".join(_module(path)))
        for name in _imported(path):
            other = _package(name)
            if other != own and LAYER[other] >= LAYER[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports advface.{name}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_function_level_and_relative_imports() -> None:
    source = "def f():\n    from advface.cli import app\n    from . import sibling\n"
    found = _imported(ROOT / "models" / "probe.py", source)
    assert found == {"cli", "models"}


def test_stage_keys_cover_the_shared_parameter_checks() -> None:
    """A protection or training validates its parameters in advface.checks: a stage key that
    fingerprints that code must fingerprint the checks too."""
    from advface.pipelines.context import EVAL_CODE, PROTECTION_CODE, TRAIN_CODE
    from advface.pipelines.eval_fr import PROTECTED_CODE
    from advface.pipelines.reproduce.extras import OFFLINE_CODE

    for parts in (EVAL_CODE, PROTECTION_CODE, TRAIN_CODE, PROTECTED_CODE, OFFLINE_CODE):
        assert "checks.py" in parts, parts
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "checks" in _imported(p))
    covered = ("protection/", "attacks/", "metrics/", "models/")
    assert users and all(u.startswith(covered) for u in users), users
