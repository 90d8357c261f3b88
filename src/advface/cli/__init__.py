"""The ``advface`` command line: one Typer app, one module per area of commands.

Each area module defines ``register(app: typer.Typer) -> None``; add it to ``_AREAS``.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="advface",
    help="Privacy-preserving adversarial facial features (AdvFace, CVPR 2023).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Modules under advface.cli, each registering its commands on ``app``.
_AREAS: tuple[str, ...] = (
    "attack",
    "bench",
    "bulk",
    "client",
    "data",
    "fr",
    "keys",
    "offline",
    "protect",
    "reproduce",
    "service",
)


@app.callback()
def _root() -> None:
    """Privacy-preserving adversarial facial features (AdvFace, CVPR 2023)."""


for _name in _AREAS:
    importlib.import_module(f"advface.cli.{_name}").register(app)


@app.command()
def version() -> None:
    """Print the package version."""
    from advface import __version__

    typer.echo(__version__)


def main() -> None:  # pragma: no cover - console entry
    app()
