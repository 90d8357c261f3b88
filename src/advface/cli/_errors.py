"""How every command reports bad input: ``error: <message>`` on stderr and exit status 2."""

from __future__ import annotations

import pickle
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

# The library raises these for bad input (wrong values, missing files, occupied outputs).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
# How long a loader's reason may get: a state dict mismatch lists every key of the model.
_MAX_REASON = 300


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _state_dict_mismatch(text: str) -> str:
    """torch's state dict error (a line per kind, listing every key) in one short line."""
    parts = []
    for kind in ("Missing", "Unexpected"):
        found = re.search(kind + r" key\(s\) in state_dict: (.*)", text)
        if found:
            names = re.findall(r'"([^"]+)"', found.group(1))
            more = ", ..." if len(names) > 3 else ""
            parts.append(f"{len(names)} {kind.lower()} ({', '.join(names[:3])}{more})")
    shapes = len(re.findall(r"size mismatch for ", text))
    if shapes:
        parts.append(f"{shapes} of another shape")
    return "; ".join(parts) or _short(text)


def _in_torch_load(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside ``torch.load`` (its unpickler fails on arbitrary bytes
    with whatever error the bytes lead to: ``KeyError``, ``IndexError``, ...)."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if name.endswith(("torch/serialization.py", "torch/_weights_only_unpickler.py")):
            return True
        tb = tb.tb_next
    return False


def load_failure(exc: BaseException) -> str | None:
    """The reason when ``exc`` says a weights or checkpoint file is not one (bytes that are not
    safetensors or a torch file, another network's tensors); ``None`` for anything else.

    A ``ValueError`` counts when a loader raised it for such an error (its ``__cause__``).
    """
    if isinstance(exc, ValueError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, pickle.UnpicklingError):
        text = str(exc)
        # torch's weights_only message is a page of advice; the cause follows this marker.
        _, marker, cause = text.partition("WeightsUnpickler error:")
        if marker:
            text = cause.split("Check the documentation")[0]
        return f"not a torch weights file ({_short(text)})"
    safetensors = sys.modules.get("safetensors")  # raised only once safetensors is imported
    if safetensors is not None and isinstance(exc, safetensors.SafetensorError):
        return f"not a safetensors file ({_short(str(exc))})"
    if isinstance(exc, RuntimeError):
        text = str(exc)
        if text.startswith("Error(s) in loading state_dict"):
            return f"tensors of another network: {_state_dict_mismatch(text)}"
        if text.startswith("PytorchStreamReader"):
            return f"not a torch weights file ({text.split('.')[0]})"
    if isinstance(exc, EOFError | KeyError | IndexError | UnicodeDecodeError) and _in_torch_load(
        exc
    ):
        return f"not a torch weights file ({type(exc).__name__}: {_short(str(exc)) or 'empty'})"
    return None


@contextmanager
def user_errors(code: int = 2) -> Iterator[None]:
    """Turn a user error raised inside the block into a message and exit status ``code``.

    A weights or checkpoint file that does not load is one too (see ``load_failure``).
    """
    try:
        yield
    except USER_ERRORS as exc:
        message = str(exc)
        cut = message.find("Error(s) in loading state_dict")
        if cut >= 0:  # a loader's ValueError quoting torch's list of every key
            message = message[:cut] + _state_dict_mismatch(message[cut:])
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code) from exc
    except Exception as exc:
        reason = load_failure(exc)
        if reason is None:
            raise
        typer.echo(f"error: not a valid weights/checkpoint file: {reason}", err=True)
        raise typer.Exit(code) from exc


@contextmanager
def loading(*sources: tuple[str, Path | str | None]) -> Iterator[None]:
    """Name the file(s) being loaded in a load failure raised inside the block.

    ``sources``: ``(option, path)`` pairs, e.g. ``("--weights", weights)``; ``None`` paths
    (a default the command chose) are left out, and with none left nothing is renamed.
    """
    named = " or ".join(f"{opt} {path}" for opt, path in sources if path is not None)
    try:
        yield
    except Exception as exc:
        reason = load_failure(exc)
        if reason is None or not named:
            raise
        raise ValueError(f"{named}: not a valid weights/checkpoint file: {reason}") from exc


def check_checkpoint_dir(path: Path, option: str) -> None:
    """Fail fast, naming the file, when a checkpoint folder's ``config.json`` is not JSON or
    its ``model.safetensors`` has no readable header (before heavy work; the loader reports
    missing files itself). Reconstruction networks and distilled heads share this layout."""
    import json

    from safetensors import SafetensorError, safe_open

    from advface.models.recon.checkpoint import CONFIG_FILE, MODEL_FILE

    if not path.is_dir():
        return
    config = path / CONFIG_FILE
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{option} {path}: {config} is not valid JSON: {exc}") from None
    weights = path / MODEL_FILE
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except SafetensorError as exc:
            raise ValueError(
                f"{option} {path}: {weights} is not a valid weights/checkpoint file: "
                f"not a safetensors file ({_short(str(exc))})"
            ) from None


def check_weights(weights: Path, cache: Path | None = None) -> None:
    """Load ``--weights`` as FaceNet once (about a second) so that a long run refuses a file
    that is not FaceNet's before it creates its output folder."""
    from advface.models.facenet import load_facenet

    with loading(("--weights", weights)):
        load_facenet(weights, cache=cache)
