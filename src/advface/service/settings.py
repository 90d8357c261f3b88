"""Service configuration: defaults, ``ADVFACE_*`` environment variables and CLI flags."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from advface.config import cache_dir

ENV_PREFIX = "ADVFACE_"
VECTOR_INDEXES = ("auto", "hnsw", "pgvector", "exact")
# Stored form of each protected map (see ``payload``); embeddings-only keeps no map at all.
STORAGE_CODECS = ("float16", "float32", "uint8", "embeddings-only")
# pgvector refuses ``hnsw.ef_search`` above this.
PGVECTOR_MAX_EF_SEARCH = 1000


def default_db_url() -> str:
    """Embedded SQLite database in the cache directory."""
    return f"sqlite:///{cache_dir() / 'service.db'}"


def default_master_key_file() -> Path:
    """Where ``advface serve`` creates a master key when none is configured."""
    return cache_dir() / "master.key"


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the template service needs; immutable once the app is built.

    Each field ``name`` can be set from the environment as ``ADVFACE_<NAME>``
    (e.g. ``ADVFACE_DB_URL``, ``ADVFACE_THRESHOLD``, ``ADVFACE_PROTECTION_PARAMS='{"steps": 40}'``).
    """

    db_url: str = ""
    # Cosine similarity of L2-normalised Psi embeddings at or above which verify says "match".
    threshold: float = 0.4
    # "default": embedding-shadow with the networks of `advface train-protection` (the toy
    # backend, a test stand-in without trained networks, defaults to none). "none" with the
    # FaceNet backend stores the clients' uploads as they are and needs allow_unprotected=1.
    protection: str = "default"
    protection_params: dict[str, Any] = field(default_factory=dict)
    allow_unprotected: int = 0
    # "facenet": the real split network; "toy": tiny deterministic stand-in (tests, smoke runs).
    backend: str = "facenet"
    # Folder of a distilled server head (``advface distill``) used as Psi instead of the
    # backend's own; its model version is recorded with every embedding. Empty: the original.
    head: str = ""
    max_body_bytes: int = 4 * 1024 * 1024
    # Largest |value| accepted in a feature map (E's ReLU maps are O(10)).
    max_feature_abs: float = 1000.0
    max_page_size: int = 500
    max_top_k: int = 100
    # Templates embedded per Psi batch during the start-up rebuild.
    rebuild_batch: int = 32
    host: str = "127.0.0.1"
    port: int = 8000
    torch_threads: int = 0  # 0: leave torch's default
    # GET /metrics (Prometheus text, aggregate only: no tenant or subject): 1 turns it on.
    # With metrics_token set, a scrape must send "Authorization: Bearer <token>".
    metrics: int = 0
    metrics_token: str = ""
    # Slow-client limits: seconds to send the request line and headers, and the whole body.
    header_timeout: float = 10.0
    read_timeout: float = 30.0
    # Request bodies buffered at once (each up to max_body_bytes); more get a 503.
    max_concurrent_uploads: int = 16
    # Token bucket per API key (requests/second, burst); rate_limit 0 turns it off.
    # In-process state: each worker process limits on its own.
    rate_limit: float = 20.0
    rate_burst: int = 40
    # Seconds to wait for a locked SQLite file or a PostgreSQL connection before a 503.
    db_timeout: float = 10.0
    # Identification index: auto | hnsw (in-process, SQLite) | pgvector | exact (scan).
    vector_index: str = "auto"
    # uvicorn worker processes; they share state only through the database.
    workers: int = 1
    # HNSW search breadth (ef) of the in-process and pgvector indexes: recall vs latency
    # (1..4096; pgvector accepts at most 1000).
    index_ef_search: int = 256
    # 1: keep the in-process HNSW graphs in "<SQLite file>.index" (fast start-up); 0: rebuild
    # them from the stored embeddings at every start.
    index_snapshots: int = 1
    # Stored form of new templates' maps: float16 (default), float32, uint8 (per-channel affine,
    # about half the bytes), embeddings-only (no map: `advface reembed`/`migrate` cannot run on
    # such templates). Each template records its form, so rows stored otherwise still decode.
    storage_codec: str = "float16"
    # File holding the master key (base64) that wraps the per-subject data keys; empty: the
    # ADVFACE_MASTER_KEY variable, else the default file when it exists (see ``crypto``).
    master_key_file: str = ""

    def __post_init__(self) -> None:
        if not self.db_url:
            object.__setattr__(self, "db_url", default_db_url())
        for f in fields(self):  # NaN passes every range check below; Inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}"
            )
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.max_feature_abs > 0:
            raise ValueError(f"max_feature_abs must be > 0, got {self.max_feature_abs}")
        if self.max_page_size < 1 or self.max_top_k < 1 or self.rebuild_batch < 1:
            raise ValueError("max_page_size, max_top_k and rebuild_batch must be >= 1")
        if self.backend not in ("facenet", "toy"):
            raise ValueError(f"backend must be 'facenet' or 'toy', got {self.backend!r}")
        if self.head and not Path(self.head).is_dir():
            raise ValueError(f"head {self.head!r} is not a folder (a distilled head)")
        if not isinstance(self.protection_params, dict):
            raise ValueError("protection_params must be a JSON object")
        if self.protection == "default":
            default = "embedding-shadow" if self.backend == "facenet" else "none"
            object.__setattr__(self, "protection", default)
        if self.allow_unprotected not in (0, 1):
            raise ValueError(f"allow_unprotected must be 0 or 1, got {self.allow_unprotected}")
        if self.protection == "none" and self.backend == "facenet" and not self.allow_unprotected:
            raise ValueError(
                "protection 'none' stores every client's feature map as uploaded, from which "
                "faces can be reconstructed; pass --allow-unprotected "
                "(ADVFACE_ALLOW_UNPROTECTED=1) to run so anyway"
            )
        for name in ("header_timeout", "read_timeout", "db_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_concurrent_uploads < 1 or self.rate_burst < 1:
            raise ValueError("max_concurrent_uploads and rate_burst must be >= 1")
        if self.rate_limit < 0:
            raise ValueError(f"rate_limit must be >= 0 (0: off), got {self.rate_limit}")
        if self.vector_index not in VECTOR_INDEXES:
            raise ValueError(
                f"vector_index must be one of {', '.join(VECTOR_INDEXES)}, "
                f"got {self.vector_index!r}"
            )
        if self.storage_codec not in STORAGE_CODECS:
            raise ValueError(
                f"storage_codec must be one of {', '.join(STORAGE_CODECS)}, "
                f"got {self.storage_codec!r}"
            )
        if not 1 <= self.index_ef_search <= 4096:
            raise ValueError(f"index_ef_search must be 1..4096, got {self.index_ef_search}")
        if self.index_ef_search > PGVECTOR_MAX_EF_SEARCH and self._may_use_pgvector():
            raise ValueError(
                f"index_ef_search must be 1..{PGVECTOR_MAX_EF_SEARCH} with the pgvector index "
                f"(pgvector's limit), got {self.index_ef_search}"
            )
        if self.index_snapshots not in (0, 1):
            raise ValueError(f"index_snapshots must be 0 or 1, got {self.index_snapshots}")
        if self.metrics not in (0, 1):
            raise ValueError(f"metrics must be 0 or 1, got {self.metrics}")
        if not 0 <= self.torch_threads <= 1024:
            raise ValueError(
                f"torch_threads must be 0..1024 (0: torch's default), got {self.torch_threads}"
            )
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be 1..64, got {self.workers}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")

    def _may_use_pgvector(self) -> bool:
        """Whether the index may be pgvector: named, or ``auto`` on PostgreSQL (where the
        server has the extension)."""
        scheme = self.db_url.split(":", 1)[0].split("+", 1)[0]
        postgres = scheme in ("postgresql", "postgres")
        return self.vector_index == "pgvector" or (self.vector_index == "auto" and postgres)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """Build settings from ``ADVFACE_*`` variables; non-``None`` ``overrides`` win."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """``ADVFACE_*`` variables that :meth:`from_env` turns back into these settings
        (how ``--workers N`` hands the configuration to each worker process)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[ENV_PREFIX + f.name.upper()] = json.dumps(v) if isinstance(v, dict) else str(v)
        return out

    def with_(self, **changes: Any) -> ServiceSettings:
        """Copy with some fields changed."""
        return replace(self, **changes)


def _parse(name: str, type_name: Any, raw: str) -> Any:
    type_name = str(type_name)
    try:
        if type_name.startswith("dict"):
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            return value
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from exc
    return raw
