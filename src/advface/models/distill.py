"""A server head Psi' distilled from Psi for protected features (the paper's offline mode).

The student has the teacher's architecture and starts from its weights; only a tail of it is
trained (``train_from``), the layers before stay the teacher's and are frozen. So a checkpoint
holds just the trained tail, and loading one needs the teacher it was distilled from (checked
by fingerprint): ``model.safetensors`` (tail weights) + ``config.json`` (teacher fingerprint,
``train_from``, protection, data, steps, loss curve, ``model_version``).

``train_from`` for a FaceNet :class:`~advface.models.split.ServerHead`: a stage name of Psi
(``repeat_2`` trains repeat_2 ... block8 and the embedding head), ``"last_linear"`` (only the
final linear layer and batch norm) or ``"all"``; any other module takes only ``"all"``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from advface.models.facenet import embedding_head
from advface.models.fingerprint import state_fingerprint
from advface.models.recon.checkpoint import atomic_save_tensors, atomic_write_bytes
from advface.models.split import ServerHead

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "HeadParts",
    "head_parts",
    "load_student",
    "make_student",
    "read_student_config",
    "save_student",
    "state_fingerprint",
    "train_from_choices",
]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "advface-distilled-head/1"
VERSION_PREFIX = "psi-distilled-"


def train_from_choices(head: nn.Module) -> list[str]:
    """Valid ``train_from`` values for ``head`` (earliest first)."""
    if isinstance(head, ServerHead):
        return ["all", *(n for n, _ in head.stages.named_children()), "last_linear"]
    return ["all"]


class _Tail(nn.Module):
    """The stages of a ServerHead from one on, then its embedding head (shares modules)."""

    def __init__(self, head: ServerHead, names: list[str]) -> None:
        super().__init__()
        self.stages = nn.Sequential(*(getattr(head.stages, n) for n in names))
        self.dropout, self.last_linear, self.last_bn = head.dropout, head.last_linear, head.last_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embedding_head(self.stages(x), self.dropout, self.last_linear, self.last_bn)


class HeadParts:
    """``head`` cut at ``train_from`` into a frozen ``prefix`` and a trainable ``tail`` (both
    share the head's modules): ``tail(prefix(z)) == head(z)``. ``tail_keys`` are the head's
    state-dict keys that belong to the tail."""

    def __init__(self, head: nn.Module, train_from: str) -> None:
        choices = train_from_choices(head)
        if train_from not in choices:
            raise ValueError(
                f"train_from {train_from!r} is not valid for {type(head).__name__}; "
                f"choose one of {', '.join(choices)}"
            )
        self.train_from = train_from
        if train_from == "all":
            self.prefix: nn.Module = nn.Identity()
            self.tail: nn.Module = head
            self.tail_keys = sorted(head.state_dict())
            return
        assert isinstance(head, ServerHead)
        names = [n for n, _ in head.stages.named_children()]
        cut = len(names) if train_from == "last_linear" else names.index(train_from)
        self.prefix = nn.Sequential(*(getattr(head.stages, n) for n in names[:cut]))
        self.tail = _Tail(head, names[cut:])
        tail_mods = [f"stages.{n}." for n in names[cut:]] + ["last_linear.", "last_bn."]
        self.tail_keys = sorted(k for k in head.state_dict() if k.startswith(tuple(tail_mods)))


def head_parts(head: nn.Module, train_from: str) -> HeadParts:
    """Cut ``head`` at ``train_from`` (see :class:`HeadParts`)."""
    return HeadParts(head, train_from)


def make_student(teacher: nn.Module, train_from: str) -> tuple[nn.Module, HeadParts]:
    """A copy of ``teacher`` in eval mode whose tail (from ``train_from``) requires grad and
    whose prefix is frozen. Eval mode throughout: the batch norms keep the teacher's statistics
    and dropout stays off, so only the weights move."""
    if not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be a torch module, got {type(teacher).__name__}")
    student = copy.deepcopy(teacher).eval()
    parts = head_parts(student, train_from)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in parts.tail.parameters():
        p.requires_grad_(True)
    return student, parts


def _version(teacher_fp: str, tail: dict[str, torch.Tensor], train_from: str) -> str:
    h = hashlib.sha256(f"{teacher_fp}|{train_from}|".encode())
    for key in sorted(tail):
        t = tail[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return VERSION_PREFIX + h.hexdigest()[:16]


def save_student(
    directory: str | Path,
    student: nn.Module,
    *,
    teacher_fingerprint: str,
    train_from: str,
    **meta: Any,
) -> dict[str, Any]:
    """Write the student's tail weights and ``config.json`` (``meta``: protection, data, steps,
    losses ... JSON-serialisable); returns the config, whose ``model_version`` is derived from
    the teacher's fingerprint and the tail's weights."""
    parts = head_parts(student, train_from)
    state = student.state_dict()
    tail = {k: state[k] for k in parts.tail_keys}
    config = {
        "format": FORMAT,
        "teacher_class": type(student).__name__,
        "teacher_fingerprint": teacher_fingerprint,
        "train_from": train_from,
        "tail_keys": parts.tail_keys,
        "model_version": _version(teacher_fingerprint, tail, train_from),
        **meta,
    }
    text = json.dumps(config, indent=1, default=str)  # fail before touching the directory
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tail, directory / MODEL_FILE)
    atomic_write_bytes(directory / CONFIG_FILE, (text + "\n").encode())
    return config


def read_student_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a distilled head (``ValueError`` if it is not one)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file() or not (Path(directory) / MODEL_FILE).is_file():
        raise ValueError(
            f"{directory} is not a distilled head (needs {MODEL_FILE} + {CONFIG_FILE})"
        )
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_student(directory: str | Path, teacher: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a distilled head on ``teacher`` (the Psi it was distilled from, checked by
    fingerprint and class); the weights are checked against the recorded ``model_version``.
    Returns ``(student in eval mode, frozen, config)``."""
    config = read_student_config(directory)
    if type(teacher).__name__ != config["teacher_class"]:
        raise ValueError(
            f"{directory} was distilled from a {config['teacher_class']}, "
            f"not a {type(teacher).__name__}"
        )
    fp = state_fingerprint(teacher)
    if fp != config["teacher_fingerprint"]:
        raise ValueError(
            f"{directory} was distilled from another Psi (teacher fingerprint "
            f"{config['teacher_fingerprint'][:12]}, this one {fp[:12]})"
        )
    tail = load_file(str(Path(directory) / MODEL_FILE))
    if sorted(tail) != sorted(config["tail_keys"]):
        raise ValueError(f"{directory}: weights do not match the config's tail_keys")
    if _version(fp, tail, config["train_from"]) != config["model_version"]:
        raise ValueError(f"{directory}: weights do not match model_version (altered file?)")
    student = copy.deepcopy(teacher).eval()
    missing = set(tail) - set(student.state_dict())
    if missing:
        raise ValueError(f"{directory}: keys not in the teacher, e.g. {sorted(missing)[0]}")
    student.load_state_dict(tail, strict=False)
    for p in student.parameters():
        p.requires_grad_(False)
    return student, config
