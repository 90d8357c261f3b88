"""SQLAlchemy schema of the service database, its creation and the embedding vector codec.

Tables: tenants and their API keys, subjects with their wrapped data keys, tenant transform
seeds, protected templates and, in ``template_embeddings``, Psi's embedding of each stored map
per Psi version. On SQLite, :func:`create_schema` also adds the embeddings' change log and the
covering metadata indexes. (The HTTP API's request and response models are in ``schemas``.)
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

log = logging.getLogger("advface.service")


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of the service schema."""


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    digest: Mapped[str] = mapped_column(String(64))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Subject(Base):
    __tablename__ = "subjects"
    __table_args__ = (UniqueConstraint("tenant_id", "subject_id", name="uq_subject_per_tenant"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    subject_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class SubjectKey(Base):
    """A subject's data key, wrapped by the master key (encryption at rest, see ``crypto``).

    Deleting the subject deletes this row: every copy of its sealed rows becomes unreadable.
    """

    __tablename__ = "subject_keys"
    subject_pk: Mapped[int] = mapped_column(
        ForeignKey("subjects.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[int] = mapped_column(Integer)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    # Fingerprint of the master key it is wrapped under (``crypto.key_id``): rotation resumes
    # from the rows still under the old key.
    master_id: Mapped[str] = mapped_column(String(32), index=True)


class TenantTransform(Base):
    """The seed of a tenant's secret orthogonal transform of its index vectors (``transform``),
    wrapped by the master key like the data keys."""

    __tablename__ = "tenant_transforms"
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    master_id: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


# SQLite change log of the embeddings (``index_changes``), written by triggers in the same
# transaction as every insert, update or (cascaded) delete of an embedding. SQLite commits
# writers one at a time, so ``seq`` order is commit order: a worker that has applied every change
# up to ``seq`` holds exactly the database's state, and catches up by reading what follows.
_SQLITE_CHANGE_LOG = (
    "CREATE TABLE IF NOT EXISTS index_changes ("
    "seq INTEGER PRIMARY KEY AUTOINCREMENT, template_id VARCHAR(32) NOT NULL, "
    "version VARCHAR(128) NOT NULL)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS trg_embedding_{op.lower()} AFTER {op} "
        f"ON template_embeddings BEGIN INSERT INTO index_changes (template_id, version) "
        f"VALUES ({row}.template_id, {row}.version); END"
        for op, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
    ),
    # A random id per database: an index snapshot is only valid for the log it was taken from.
    "CREATE TABLE IF NOT EXISTS index_log_id (id VARCHAR(32) PRIMARY KEY)",
)


# SQLite keeps a row's columns in order and a large ``blob`` spills into overflow pages that
# must be walked to reach the columns after it: a query reading only metadata would read every
# stored map. These covering indexes answer the metadata queries (start-up counts, statistics)
# without reading the rows, and the batch loops of re-embedding and migration read only the rows
# they return. Created at start-up, so existing databases gain them too.
_SQLITE_META_INDEXES = (
    "CREATE INDEX IF NOT EXISTS ix_templates_meta ON templates "
    "(model_version, id, map_codec, protection, protection_params)",
    "CREATE INDEX IF NOT EXISTS ix_templates_tenant_meta ON templates "
    "(tenant_id, protection, protection_params, model_version)",
)


class Template(Base):
    __tablename__ = "templates"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_idempotency_per_tenant"),
        Index("ix_templates_subject", "subject_pk"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    subject_pk: Mapped[int] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"))
    # Protected feature map, payload format (fp16, shape header, compressed); b"" when the
    # deployment keeps embeddings only.
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    # Stored form of the map: float16 | float32 | uint8 | none (embeddings only, no map kept).
    # NULL: a row of an earlier version (a payload blob, whose header names its dtype).
    map_codec: Mapped[str | None] = mapped_column(String(32), nullable=True)
    protection: Mapped[str] = mapped_column(String(32))
    protection_params: Mapped[str] = mapped_column(Text)  # JSON
    model_version: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # SHA-256 of the client's request payload: tells an honest retry from a reused key.
    request_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class TemplateEmbedding(Base):
    """Psi embedding (float32, unit norm) of a stored protected map, per Psi version."""

    __tablename__ = "template_embeddings"
    __table_args__ = (Index("ix_embeddings_tenant_version", "tenant_id", "version"),)
    template_id: Mapped[str] = mapped_column(
        ForeignKey("templates.id", ondelete="CASCADE"), primary_key=True
    )
    # A new Psi version gets its own rows (``advface reembed``) while the old one keeps serving.
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)  # denormalised: tenant-filtered scans
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # little-endian float32
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


def encode_vector(v: np.ndarray) -> bytes:
    """float32 little-endian bytes of a 1-D vector."""
    return np.ascontiguousarray(np.asarray(v, "<f4").reshape(-1)).tobytes()


def decode_vector(b: bytes) -> np.ndarray:
    return np.frombuffer(b, "<f4").astype(np.float32)


def create_schema(engine: Engine) -> None:
    """Create what is missing: tables, columns added since, and on SQLite the change log and
    the metadata indexes. A database of an earlier version thus gains the embeddings table
    (its templates are then embedded once, see ``core.Service.backfill``)."""
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            for ddl in _SQLITE_CHANGE_LOG:
                conn.execute(text(ddl))
        _add_sqlite_indexes(engine)


def _add_missing_columns(engine: Engine) -> None:
    """Columns added since a database was created (``create_all`` adds only tables)."""
    have = {c["name"] for c in inspect(engine).get_columns("templates")}
    if "map_codec" in have:
        return
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE templates ADD COLUMN map_codec VARCHAR(32)"))
    except DBAPIError:  # another worker added it at the same moment
        have = {c["name"] for c in inspect(engine).get_columns("templates")}
        if "map_codec" not in have:
            raise


def _add_sqlite_indexes(engine: Engine) -> None:
    """Create the metadata indexes where missing (``_SQLITE_META_INDEXES``)."""
    try:
        with engine.begin() as conn:
            for ddl in _SQLITE_META_INDEXES:
                conn.execute(text(ddl))
    except OperationalError as exc:
        # Building them over a large existing table takes a while, under the write lock:
        # a worker starting meanwhile goes on without (they only speed queries up).
        if getattr(exc.orig, "sqlite_errorname", "") not in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            raise
        log.warning("another process is indexing the templates; starting without waiting")
