"""Repository of tenants, keys, subjects and protected templates (``Store``).

Each template is a protected feature map (compressed blob, see ``payload``; ``map_codec`` says
in which stored form, ``none`` when only the embedding is kept) plus Psi's embedding of that
stored map, keyed by the Psi version that computed it. The embedding is a function of the
stored map, so it reveals nothing the map does not; keeping it means start-up loads vectors
instead of running Psi over every template. The tables are in ``tables``, the engine set-up in
``database``.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from advface.service import auth, crypto, payload
from advface.service.database import make_engine
from advface.service.tables import (
    ApiKey,
    Subject,
    SubjectKey,
    Template,
    TemplateEmbedding,
    Tenant,
    TenantTransform,
    create_schema,
    decode_vector,
    encode_vector,
    utc_now,
)

log = logging.getLogger("advface.service")


@dataclass(frozen=True)
class Embedded:
    """One stored embedding with what identification reports about it."""

    template_id: str
    tenant_id: int
    subject_id: str
    vector: np.ndarray


# (template_id, tenant_id, version, vector)
VectorRow = tuple[str, int, str, np.ndarray]


@dataclass(frozen=True)
class TemplateRow:
    """A stored template as the service reports it."""

    template_id: str
    tenant_id: int
    subject_id: str
    protection: str
    protection_params: dict[str, Any]
    model_version: str
    created_at: datetime
    request_sha256: str
    blob: bytes = b""


@dataclass(frozen=True)
class KeyInfo:
    """What ``advface keys list`` shows of a key: never the secret or its digest."""

    key_id: str
    tenant: str
    created_at: datetime
    revoked: bool


class IdempotencyConflict(Exception):
    """An idempotency key was reused with a different request body or subject."""


class NotFound(Exception):
    """A subject or template does not exist for this tenant."""


class AlreadyExists(Exception):
    """A subject with this id already exists for this tenant."""


def _transform_ctx(tenant_id: int) -> bytes:
    return crypto.aad("tenant-transform", tenant_id, 0)


class _Keys:
    """Seals and opens one operation's values; unwrapped data keys live only as long as it."""

    def __init__(self, provider: crypto.KeyProvider | None) -> None:
        self.provider = provider
        self._cache: dict[int, bytes] = {}

    def key(
        self, s: Session, tenant_id: int, subject_pk: int, wrapped: bytes | None = None
    ) -> bytes:
        """The subject's data key, created (and stored wrapped) on first use."""
        if subject_pk in self._cache:
            return self._cache[subject_pk]
        assert self.provider is not None
        ctx = crypto.aad("data-key", tenant_id, subject_pk)
        if wrapped is None:
            row = s.get(SubjectKey, subject_pk)
            wrapped = None if row is None else row.wrapped
        if wrapped is None:  # a subject created before encryption was turned on
            key = crypto.new_data_key()
            s.add(
                SubjectKey(
                    subject_pk=subject_pk,
                    tenant_id=tenant_id,
                    wrapped=self.provider.wrap(key, ctx),
                    master_id=self.provider.key_id,
                )
            )
            s.flush()
        else:
            key = self.provider.unwrap(wrapped, ctx)
        self._cache[subject_pk] = key
        return key

    def seal(
        self, s: Session, value: bytes, purpose: str, tenant: int, subj: int, tid: str
    ) -> bytes:
        if self.provider is None:
            return value
        ad = crypto.aad(purpose, tenant, subj, tid)
        return crypto.seal(self.key(s, tenant, subj), value, ad)

    def open(
        self,
        s: Session,
        value: bytes,
        purpose: str,
        tenant: int,
        subj: int,
        tid: str,
        wrapped: bytes | None = None,
    ) -> bytes:
        if not crypto.is_sealed(value):
            return value  # written in clear, before encryption was turned on
        if self.provider is None:
            raise crypto.MasterKeyError(
                "the database holds encrypted data: configure the master key"
            )
        if wrapped is None and s.get(SubjectKey, subj) is None:
            raise crypto.DecryptionError("the subject's data key is gone (deleted subject)")
        key = self.key(s, tenant, subj, wrapped)
        return crypto.open_sealed(key, value, crypto.aad(purpose, tenant, subj, tid))


def _vec_purpose(version: str) -> str:
    return f"embedding:{version}"


class Store:
    """Repository: every public method is one transaction.

    With ``keys`` (a master-key provider) every map and embedding written is sealed under
    its subject's data key (``crypto``); rows written in clear earlier stay readable.
    """

    def __init__(
        self, url: str, *, timeout: float = 10.0, keys: crypto.KeyProvider | None = None
    ) -> None:
        self.keys = keys
        self.engine = make_engine(url, timeout)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        create_schema(self.engine)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        # Called inside every transaction that writes embeddings, with
        # ``[(template_id, tenant_id, version, vector)]``: an index kept in the database
        # (pgvector) is written atomically with them.
        self.vector_writer: Callable[[Session, list[VectorRow]], None] | None = None

    def close(self) -> None:
        self.engine.dispose()

    def transaction(self) -> Any:
        """``with store.transaction() as session:`` - committed on success (index modules)."""
        return self._sessions.begin()

    def ping(self) -> bool:
        """True when the database answers (a real table read, not just an open connection)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1 FROM api_keys LIMIT 1"))
            return True
        except Exception:  # noqa: BLE001 - readiness must report, not raise
            return False

    # -- tenants and keys ---------------------------------------------------------------
    def create_key(self, tenant_name: str) -> str:
        """Create the tenant if needed and a new API key for it; return the token (shown once)."""
        if not tenant_name or len(tenant_name) > 128:
            raise ValueError("tenant name must be 1..128 characters")
        new = auth.generate_key()
        with self._sessions.begin() as s:
            tenant = s.scalar(select(Tenant).where(Tenant.name == tenant_name))
            if tenant is None:
                tenant = Tenant(name=tenant_name)
                s.add(tenant)
                s.flush()
            s.add(ApiKey(key_id=new.key_id, tenant_id=tenant.id, digest=new.digest))
        return new.token

    def authenticate(self, token: str) -> int | None:
        """Tenant id for a valid, unrevoked token, else ``None``."""
        key_id = auth.parse_key_id(token)
        if key_id is None:
            return None
        with self._sessions() as s:
            row = s.get(ApiKey, key_id)
            if row is None or row.revoked or not auth.matches(token, row.digest):
                return None
            return row.tenant_id

    def list_keys(self) -> list[KeyInfo]:
        """Every API key with its tenant (never the digest), oldest first."""
        with self._sessions() as s:
            rows = s.execute(
                select(ApiKey.key_id, Tenant.name, ApiKey.created_at, ApiKey.revoked)
                .join(Tenant, Tenant.id == ApiKey.tenant_id)
                .order_by(ApiKey.created_at, ApiKey.key_id)
            ).all()
        return [
            KeyInfo(k, t, c if c.tzinfo else c.replace(tzinfo=UTC), bool(r)) for k, t, c, r in rows
        ]

    def tenant_id(self, tenant_name: str) -> int:
        """The id of a tenant by name; ``NotFound`` when there is none."""
        with self._sessions() as s:
            tid = s.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
        if tid is None:
            raise NotFound(f"tenant {tenant_name!r}")
        return int(tid)

    # -- tenant transforms (``transform``) ------------------------------------------------
    def transform_seed(self, tenant_id: int) -> bytes:
        """The tenant's transform seed, created (stored wrapped) on first use."""
        if self.keys is None:
            raise crypto.MasterKeyError("tenant transforms need a master key")
        for _ in range(2):
            with self._sessions() as s:
                row = s.get(TenantTransform, tenant_id)
                if row is not None:
                    return self.keys.unwrap(row.wrapped, _transform_ctx(tenant_id))
            try:
                with self._sessions.begin() as s:
                    return self.ensure_transform_seed(s, tenant_id)[0]
            except IntegrityError:  # another worker created it first, or no such tenant
                continue
        raise NotFound(f"tenant {tenant_id}")

    def ensure_transform_seed(self, s: Session, tenant_id: int) -> tuple[bytes, bool]:
        """``(seed, created)``: the tenant's stored transform seed, or a new one stored in
        ``s`` where it has none. Never replaces one: workers may already search with it.

        Raises ``IntegrityError`` (at the flush or the commit) when another transaction
        stored one meanwhile; the caller's retry then reads it.
        """
        if self.keys is None:
            raise crypto.MasterKeyError("tenant transforms need a master key")
        row = s.get(TenantTransform, tenant_id)
        if row is not None:
            return self.keys.unwrap(row.wrapped, _transform_ctx(tenant_id)), False
        seed = os.urandom(crypto.KEY_BYTES)
        wrapped = self.keys.wrap(seed, _transform_ctx(tenant_id))
        s.add(TenantTransform(tenant_id=tenant_id, wrapped=wrapped, master_id=self.keys.key_id))
        s.flush()
        return seed, True

    def new_transform_seed(self, s: Session, tenant_id: int) -> bytes:
        """Draw and store (replacing any) a new transform seed for the tenant, in ``s``: a
        rekey (``transform.rekey_tenant``), which re-transforms the vectors with it."""
        if self.keys is None:
            raise crypto.MasterKeyError("tenant transforms need a master key")
        row = s.get(TenantTransform, tenant_id)
        if row is None:
            return self.ensure_transform_seed(s, tenant_id)[0]
        seed = os.urandom(crypto.KEY_BYTES)
        row.wrapped = self.keys.wrap(seed, _transform_ctx(tenant_id))
        row.master_id, row.created_at = self.keys.key_id, utc_now()
        s.flush()
        return seed

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key (it then gets 401); False when there is no such key."""
        with self._sessions.begin() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                return False
            row.revoked = True
            return True

    # -- subjects ---------------------------------------------------------------------
    def create_subject(self, tenant_id: int, subject_id: str) -> datetime:
        try:
            with self._sessions.begin() as s:
                subj = Subject(tenant_id=tenant_id, subject_id=subject_id)
                s.add(subj)
                s.flush()
                if self.keys is not None:
                    _Keys(self.keys).key(s, tenant_id, subj.id)
                return subj.created_at
        except IntegrityError:
            raise AlreadyExists(subject_id) from None

    def list_subjects(
        self, tenant_id: int, limit: int, after: str | None = None
    ) -> list[tuple[str, datetime, int]]:
        """Subjects ordered by id (keyset paging after ``after``) with template counts."""
        with self._sessions() as s:
            counts = (
                select(Template.subject_pk, func.count().label("n"))
                .group_by(Template.subject_pk)
                .subquery()
            )
            q = (
                select(Subject.subject_id, Subject.created_at, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.subject_pk == Subject.id)
                .where(Subject.tenant_id == tenant_id)
                .order_by(Subject.subject_id)
                .limit(limit)
            )
            if after is not None:
                q = q.where(Subject.subject_id > after)
            return [(a, b, int(c)) for a, b, c in s.execute(q).all()]

    def delete_subject(self, tenant_id: int, subject_id: str) -> list[str]:
        """Delete a subject and its templates; return the deleted template ids."""
        with self._sessions.begin() as s:
            subj = self._subject(s, tenant_id, subject_id)
            ids = list(s.scalars(select(Template.id).where(Template.subject_pk == subj.id)))
            s.execute(delete(Template).where(Template.subject_pk == subj.id))
            # Crypto-shredding: without its data key no copy of the subject's rows decrypts.
            s.execute(delete(SubjectKey).where(SubjectKey.subject_pk == subj.id))
            s.delete(subj)
        self._checkpoint()
        return ids

    def _checkpoint(self) -> None:
        """SQLite: move the WAL into the file and truncate it, so the deleted (zeroed) pages'
        earlier versions leave the ``-wal`` file too. Best effort: a reader elsewhere may hold
        the WAL, which the next checkpoint then truncates."""
        if not self.is_sqlite:
            return
        try:
            with self.engine.connect() as conn:
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        except Exception:  # noqa: BLE001 - the deletion itself is committed
            pass

    def subject_exists(self, tenant_id: int, subject_id: str) -> bool:
        with self._sessions() as s:
            return (
                s.scalar(
                    select(Subject.id).where(
                        Subject.tenant_id == tenant_id, Subject.subject_id == subject_id
                    )
                )
                is not None
            )

    @staticmethod
    def _subject(s: Session, tenant_id: int, subject_id: str) -> Subject:
        subj = s.scalar(
            select(Subject).where(Subject.tenant_id == tenant_id, Subject.subject_id == subject_id)
        )
        if subj is None:
            raise NotFound(f"subject {subject_id!r}")
        return subj

    # -- templates --------------------------------------------------------------------
    def find_idempotent(self, tenant_id: int, key: str) -> TemplateRow | None:
        """The template already enrolled under an idempotency key, if any."""
        with self._sessions() as s:
            row = s.execute(
                select(Template, Subject.subject_id)
                .join(Subject, Subject.id == Template.subject_pk)
                .where(Template.tenant_id == tenant_id, Template.idempotency_key == key)
            ).first()
            return None if row is None else _row(row[0], row[1])

    def add_template(
        self,
        tenant_id: int,
        subject_id: str,
        blob: bytes,
        *,
        protection: str,
        protection_params: dict[str, Any],
        model_version: str,
        request_sha256: str,
        idempotency_key: str | None = None,
        embedding: tuple[str, np.ndarray] | None = None,
    ) -> tuple[TemplateRow, bool]:
        """Store one protected template (and ``(version, vector)``, its embedding) in one
        transaction.

        Returns ``(row, created)``; ``created`` is False when ``idempotency_key`` was already used
        for the same request (then nothing is written). Raises ``NotFound`` for an unknown subject
        and ``IdempotencyConflict`` when the key was used for a different request.
        """
        try:
            with self._sessions.begin() as s:
                subj = self._subject(s, tenant_id, subject_id)
                tid, keys = uuid.uuid4().hex, _Keys(self.keys)
                t = Template(
                    id=tid,
                    tenant_id=tenant_id,
                    subject_pk=subj.id,
                    blob=keys.seal(s, blob, "map", tenant_id, subj.id, tid),
                    map_codec=map_codec(blob),
                    protection=protection,
                    protection_params=json.dumps(protection_params, sort_keys=True),
                    model_version=model_version,
                    idempotency_key=idempotency_key,
                    request_sha256=request_sha256,
                )
                s.add(t)
                s.flush()
                if embedding is not None:
                    row = (t.id, tenant_id, embedding[0], embedding[1])
                    self._write_vectors(s, [row], {t.id: subj.id}, keys)
                return _row(t, subject_id), True
        except IntegrityError:
            # Lost a race with a concurrent retry using the same idempotency key, or with a
            # deletion of the subject (its row gone before ours referenced it).
            prior = None
            if idempotency_key is not None:
                prior = self.find_idempotent(tenant_id, idempotency_key)
            if prior is None:
                if not self.subject_exists(tenant_id, subject_id):
                    raise NotFound(f"subject {subject_id!r}") from None
                raise
            if prior.request_sha256 != request_sha256 or prior.subject_id != subject_id:
                raise IdempotencyConflict(idempotency_key) from None
            return prior, False

    def get_template(
        self, tenant_id: int, template_id: str, *, with_blob: bool = True
    ) -> TemplateRow:
        """A template (with its decrypted map unless ``with_blob`` is False)."""
        with self._sessions() as s:
            row = s.execute(
                select(Template, Subject.subject_id)
                .join(Subject, Subject.id == Template.subject_pk)
                .where(Template.tenant_id == tenant_id, Template.id == template_id)
            ).first()
            if row is None:
                raise NotFound(f"template {template_id!r}")
            if not with_blob:
                return _row(row[0], row[1])
            return _row(row[0], row[1], blob=self._open_map(s, _Keys(self.keys), row[0]))

    def delete_template(self, tenant_id: int, template_id: str) -> None:
        with self._sessions.begin() as s:
            n = s.execute(
                delete(Template).where(Template.tenant_id == tenant_id, Template.id == template_id)
            ).rowcount
            if not n:
                raise NotFound(f"template {template_id!r}")

    def count_templates(self, tenant_id: int | None = None) -> int:
        with self._sessions() as s:
            q = select(func.count()).select_from(Template)
            if tenant_id is not None:
                q = q.where(Template.tenant_id == tenant_id)
            return int(s.scalar(q) or 0)

    def iter_templates(self, batch: int = 256) -> Iterator[TemplateRow]:
        """All templates of all tenants with their blobs, streamed (start-up rebuild)."""
        with self._sessions() as s:
            q = (
                select(Template, Subject.subject_id)
                .join(Subject, Subject.id == Template.subject_pk)
                .order_by(Template.created_at, Template.id)
                .execution_options(yield_per=batch)
            )
            keys = _Keys(self.keys)
            for t, sid in s.execute(q):
                yield _row(t, sid, blob=self._open_map(s, keys, t))

    @staticmethod
    def _open_map(s: Session, keys: _Keys, t: Template) -> bytes:
        return keys.open(s, t.blob, "map", t.tenant_id, t.subject_pk, t.id)

    # -- embeddings ---------------------------------------------------------------------
    def _write_vectors(
        self, s: Session, rows: list[VectorRow], subjects: dict[str, int], keys: _Keys
    ) -> None:
        """Insert embedding rows (sealed with their subject's key); ``subjects``: template id
        -> subject pk."""
        for tid, tenant, version, vec in rows:
            value = keys.seal(
                s, encode_vector(vec), _vec_purpose(version), tenant, subjects[tid], tid
            )
            s.add(
                TemplateEmbedding(template_id=tid, version=version, tenant_id=tenant, vector=value)
            )
        s.flush()
        if self.vector_writer is not None and rows:
            self.vector_writer(s, rows)

    def put_embeddings(self, version: str, items: Sequence[tuple[str, np.ndarray]]) -> int:
        """Store (or replace) the ``version`` embeddings of these templates, one transaction.

        Templates deleted meanwhile are skipped; returns how many were written.
        """
        ids = [tid for tid, _ in items]
        for attempt in range(3):
            try:
                with self._sessions.begin() as s:
                    q = select(Template.id, Template.tenant_id, Template.subject_pk)
                    found = s.execute(q.where(Template.id.in_(ids))).all()
                    tenants = {t: n for t, n, _ in found}
                    s.execute(
                        delete(TemplateEmbedding).where(
                            TemplateEmbedding.version == version,
                            TemplateEmbedding.template_id.in_(ids),
                        )
                    )
                    rows = [(t, tenants[t], version, v) for t, v in items if t in tenants]
                    self._write_vectors(s, rows, {t: p for t, _, p in found}, _Keys(self.keys))
                    return len(rows)
            except IntegrityError:
                # Another worker embedded the same templates at the same time (PostgreSQL), or
                # one was deleted meanwhile: the next attempt sees the committed state.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def missing_embeddings(
        self, version: str, model_version: str, after: str = "", batch: int = 64
    ) -> list[tuple[str, bytes]]:
        """``(template_id, blob)`` of templates of ``model_version`` with no ``version``
        embedding, in id order after ``after`` (so a batch loop is resumable and terminates)."""
        with self._sessions() as s:
            has = select(TemplateEmbedding.template_id).where(
                TemplateEmbedding.template_id == Template.id, TemplateEmbedding.version == version
            )
            q = (
                select(Template)
                .where(Template.model_version == model_version, Template.id > after)
                .where(~has.exists(), _HAS_MAP)
                .order_by(Template.id)
                .limit(batch)
            )
            return self._open_maps(s, q)

    def _open_maps(self, s: Session, q: Any) -> list[tuple[str, bytes]]:
        """``(template_id, map)`` of the templates ``q`` selects; b"" for a map that does not
        decrypt (it fails payload decoding: counted and skipped like a corrupt blob)."""
        keys, out = _Keys(self.keys), []
        for t in s.scalars(q).all():
            try:
                out.append((t.id, self._open_map(s, keys, t)))
            except crypto.DecryptionError:
                out.append((t.id, b""))
        return out

    def count_missing_embeddings(
        self, version: str, model_version: str, *, mapless: bool = False
    ) -> int:
        """Templates of ``model_version`` without a ``version`` embedding: those with a map
        (Psi can embed them), or with ``mapless`` those stored as embeddings only (it cannot)."""
        with self._sessions() as s:
            has = select(TemplateEmbedding.template_id).where(
                TemplateEmbedding.template_id == Template.id, TemplateEmbedding.version == version
            )
            q = (
                select(func.count())
                .select_from(Template)
                .where(Template.model_version == model_version, ~has.exists())
                .where(~_HAS_MAP if mapless else _HAS_MAP)
            )
            return int(s.scalar(q) or 0)

    def count_other_models(self, model_version: str) -> int:
        """Templates whose maps come from another extractor E (not comparable, skipped)."""
        with self._sessions() as s:
            q = select(func.count()).select_from(Template)
            return int(s.scalar(q.where(Template.model_version != model_version)) or 0)

    def delete_embeddings(self, version: str, template_ids: Sequence[str]) -> int:
        """Delete these templates' ``version`` embeddings (the templates stay)."""
        with self._sessions.begin() as s:
            q = delete(TemplateEmbedding).where(
                TemplateEmbedding.version == version,
                TemplateEmbedding.template_id.in_(template_ids),
            )
            return int(s.execute(q).rowcount or 0)

    def count_embeddings(self, version: str, tenant_id: int | None = None) -> int:
        q = select(func.count()).select_from(TemplateEmbedding)
        q = q.where(TemplateEmbedding.version == version)
        if tenant_id is not None:
            q = q.where(TemplateEmbedding.tenant_id == tenant_id)
        with self._sessions() as s:
            return int(s.scalar(q) or 0)

    def drop_other_embeddings(self, keep_version: str) -> int:
        """Delete the embeddings of every version but ``keep_version`` (after a rollout)."""
        with self._sessions.begin() as s:
            q = delete(TemplateEmbedding).where(TemplateEmbedding.version != keep_version)
            return int(s.execute(q).rowcount or 0)

    def _embedded_query(self, version: str) -> Any:
        return (
            select(
                TemplateEmbedding.template_id,
                TemplateEmbedding.tenant_id,
                Subject.subject_id,
                TemplateEmbedding.vector,
                Template.subject_pk,
                SubjectKey.wrapped,
            )
            .join(Template, Template.id == TemplateEmbedding.template_id)
            .join(Subject, Subject.id == Template.subject_pk)
            .outerjoin(SubjectKey, SubjectKey.subject_pk == Template.subject_pk)
            .where(TemplateEmbedding.version == version)
        )

    def _embedded(
        self, s: Session, q: Any, version: str, *, skip_bad: bool = False
    ) -> Iterator[Embedded]:
        """Decrypted rows of an ``_embedded_query``; ``skip_bad``: log and skip rows that do
        not authenticate (bulk loads) instead of raising."""
        keys = _Keys(self.keys)
        for tid, tenant, sid, vec, subj, wrapped in s.execute(q):
            try:
                raw = keys.open(s, vec, _vec_purpose(version), tenant, subj, tid, wrapped)
            except crypto.DecryptionError:
                if not skip_bad:
                    raise
                log.error("stored embedding of template %s does not decrypt; skipped", tid)
                continue
            yield Embedded(tid, tenant, sid, decode_vector(raw))

    def iter_embeddings(
        self, version: str, tenant_id: int | None = None, batch: int = 4096
    ) -> Iterator[Embedded]:
        """Stored ``version`` embeddings (all tenants, or one), streamed."""
        q = self._embedded_query(version).execution_options(yield_per=batch)
        if tenant_id is not None:
            q = q.where(TemplateEmbedding.tenant_id == tenant_id)
        with self._sessions() as s:
            yield from self._embedded(s, q, version, skip_bad=True)

    def embeddings_of(self, version: str, template_ids: Sequence[str]) -> list[Embedded]:
        """The ``version`` embeddings of these templates that still exist."""
        q = self._embedded_query(version).where(TemplateEmbedding.template_id.in_(template_ids))
        with self._sessions() as s:
            return list(self._embedded(s, q, version, skip_bad=True))

    def subject_embeddings(self, tenant_id: int, subject_id: str, version: str) -> np.ndarray:
        """(n, d) ``version`` embeddings of one subject's templates (n may be 0).

        Raises ``crypto.DecryptionError`` when a stored row does not authenticate."""
        q = self._embedded_query(version).where(
            TemplateEmbedding.tenant_id == tenant_id, Subject.subject_id == subject_id
        )
        with self._sessions() as s:
            rows = [e.vector for e in self._embedded(s, q, version)]
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    # -- protection migration and statistics ---------------------------------------------
    def _other_protection(
        self, protection: str, params: dict[str, Any], model_version: str, mapless: bool = False
    ) -> Any:
        """Templates of ``model_version`` under another protection that have a map (or, with
        ``mapless``, that were stored as embeddings only and so cannot be re-protected)."""
        return (
            (Template.model_version == model_version)
            & or_(
                Template.protection != protection,
                Template.protection_params != json.dumps(params, sort_keys=True),
            )
            & (~_HAS_MAP if mapless else _HAS_MAP)
        )

    def to_reprotect(
        self,
        protection: str,
        params: dict[str, Any],
        model_version: str,
        after: str = "",
        batch: int = 32,
    ) -> list[tuple[str, bytes]]:
        """``(template_id, map)`` of ``model_version`` templates stored under another
        protection (or parameters), in id order after ``after``; b"" for a map that does not
        decrypt (then skipped as corrupt)."""
        where = self._other_protection(protection, params, model_version)
        q = select(Template).where(where, Template.id > after).order_by(Template.id).limit(batch)
        with self._sessions() as s:
            return self._open_maps(s, q)

    def count_to_reprotect(
        self, protection: str, params: dict[str, Any], model_version: str, *, mapless: bool = False
    ) -> int:
        where = self._other_protection(protection, params, model_version, mapless)
        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Template).where(where)) or 0)

    def replace_protected(
        self,
        items: Sequence[tuple[str, bytes, np.ndarray]],
        *,
        protection: str,
        params: dict[str, Any],
        version: str,
    ) -> int:
        """Store re-protected maps ``(template_id, blob, embedding)`` in one transaction.

        Embeddings of every Psi version are replaced by this ``version``'s (the others were
        computed from the old map). Templates deleted meanwhile are skipped.
        """
        with self._sessions.begin() as s:
            keys, rows, subjects = _Keys(self.keys), [], {}
            for tid, blob, vec in items:
                t = s.get(Template, tid)
                if t is None:
                    continue
                t.blob = keys.seal(s, blob, "map", t.tenant_id, t.subject_pk, tid)
                t.map_codec = map_codec(blob)
                t.protection = protection
                t.protection_params = json.dumps(params, sort_keys=True)
                rows.append((tid, t.tenant_id, version, vec))
                subjects[tid] = t.subject_pk
            ids = [r[0] for r in rows]
            s.execute(delete(TemplateEmbedding).where(TemplateEmbedding.template_id.in_(ids)))
            self._write_vectors(s, rows, subjects, keys)
            return len(rows)

    def template_stats(self, tenant_id: int | None = None) -> dict[str, Any]:
        """Templates in all (or per protection with its parameters, and per model version of E)."""
        with self._sessions() as s:
            cols = (Template.protection, Template.protection_params)
            q_prot = select(*cols, func.count()).group_by(*cols).order_by(*cols)
            q_model = (
                select(Template.model_version, func.count())
                .group_by(Template.model_version)
                .order_by(Template.model_version)
            )
            if tenant_id is not None:
                q_prot = q_prot.where(Template.tenant_id == tenant_id)
                q_model = q_model.where(Template.tenant_id == tenant_id)
            prot = s.execute(q_prot).all()
            models = {m: int(n) for m, n in s.execute(q_model).all()}
        return {
            "templates": sum(models.values()),
            "by_protection": [
                {"protection": p, "protection_params": json.loads(j), "templates": int(n)}
                for p, j, n in prot
            ],
            "by_model_version": models,
        }

    # -- master key -----------------------------------------------------------------------
    def check_master_key(self) -> None:
        """Raise ``crypto.MasterKeyError`` unless every stored data key is wrapped by the
        configured master key (none configured, with encrypted rows stored: an error too)."""
        with self._sessions() as s:
            held: dict[str, int] = {}
            for col in (SubjectKey.master_id, TenantTransform.master_id):
                for m, n in s.execute(select(col, func.count()).group_by(col)).all():
                    held[m] = held.get(m, 0) + int(n)
        if not held:
            return
        if self.keys is None:
            raise crypto.MasterKeyError(
                f"the database holds encrypted templates ({sum(held.values())} subject/tenant keys "
                f"under master key {', '.join(sorted(held))}) but no master key is configured: "
                f"set --master-key-file / ADVFACE_MASTER_KEY_FILE or ADVFACE_MASTER_KEY"
            )
        other = sorted(set(held) - {self.keys.key_id})
        if other:
            raise crypto.MasterKeyError(
                f"{sum(held[m] for m in other)} subject/tenant keys are wrapped by master key(s) "
                f"{', '.join(other)}, not by the configured key {self.keys.key_id}: wrong key, "
                "or an unfinished rotation (rerun advface keys rotate-master)"
            )

    def rotate_master(
        self,
        new: crypto.KeyProvider,
        *,
        batch: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Re-wrap every data key and tenant transform seed under ``new`` (the maps and
        embeddings are not touched).

        Each batch is one transaction, and rows already under ``new`` are skipped, so an
        interrupted rotation resumes where it stopped. Returns how many keys were re-wrapped.
        """
        if self.keys is None:
            raise crypto.MasterKeyError("rotating needs the current master key")
        old, done = self.keys, 0
        tables: list[tuple[Any, Any, Callable[[Any], bytes]]] = [
            (
                SubjectKey,
                SubjectKey.subject_pk,
                lambda r: crypto.aad("data-key", r.tenant_id, r.subject_pk),
            ),
            (TenantTransform, TenantTransform.tenant_id, lambda r: _transform_ctx(r.tenant_id)),
        ]
        for table, pk, context in tables:
            while True:
                with self._sessions.begin() as s:
                    q = select(table).where(table.master_id != new.key_id)
                    rows = list(s.scalars(q.order_by(pk).limit(batch)))
                    for r in rows:
                        if r.master_id != old.key_id:
                            raise crypto.MasterKeyError(
                                f"{table.__tablename__} row {getattr(r, pk.key)} is under "
                                f"master key {r.master_id}, neither the current "
                                f"({old.key_id}) nor the new one"
                            )
                        ctx = context(r)
                        r.wrapped = new.wrap(old.unwrap(r.wrapped, ctx), ctx)
                        r.master_id = new.key_id
                if not rows:
                    break
                done += len(rows)
                if on_batch is not None:
                    on_batch(len(rows))
        self.keys = new
        return done

    # -- SQLite change log --------------------------------------------------------------
    def change_bounds(self) -> tuple[int, int]:
        """(first, last) ``seq`` in the change log; (0, 0) when it is empty."""
        with self.engine.connect() as conn:
            lo, hi = conn.execute(text("SELECT min(seq), max(seq) FROM index_changes")).one()
        return int(lo or 0), int(hi or 0)

    def change_log_id(self) -> str:
        """This database's change-log id (created once)."""
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO index_log_id (id) SELECT :i "
                    "WHERE NOT EXISTS (SELECT 1 FROM index_log_id)"
                ),
                {"i": uuid.uuid4().hex},
            )
            return str(conn.execute(text("SELECT id FROM index_log_id")).scalar())

    def changes_after(self, seq: int, limit: int = 10_000) -> list[tuple[int, str, str]]:
        """``(seq, template_id, version)`` logged after ``seq``, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT seq, template_id, version FROM index_changes WHERE seq > :s "
                    "ORDER BY seq LIMIT :n"
                ),
                {"s": seq, "n": limit},
            ).all()
        return [(int(a), b, c) for a, b, c in rows]

    def prune_changes(self, keep: int) -> int:
        """Drop all but the last ``keep`` log entries (a worker further behind reloads)."""
        with self.engine.begin() as conn:
            hi = conn.execute(text("SELECT max(seq) FROM index_changes")).scalar() or 0
            q = text("DELETE FROM index_changes WHERE seq <= :s")
            return int(conn.execute(q, {"s": int(hi) - keep}).rowcount or 0)


# Templates whose map is stored (every row of an earlier version has one).
_HAS_MAP = or_(Template.map_codec.is_(None), Template.map_codec != "none")


def map_codec(blob: bytes) -> str | None:
    """The stored form of a blob: its payload dtype, ``none`` for no map (b""), ``None`` for
    bytes that are not a payload (reported as corrupt where they are decoded)."""
    if not blob:
        return "none"
    try:
        return payload.stored_dtype(blob)
    except payload.PayloadError:
        return None


def _row(t: Template, subject_id: str, *, blob: bytes = b"") -> TemplateRow:
    return TemplateRow(
        template_id=t.id,
        tenant_id=t.tenant_id,
        subject_id=subject_id,
        protection=t.protection,
        protection_params=json.loads(t.protection_params),
        model_version=t.model_version,
        created_at=t.created_at,
        request_sha256=t.request_sha256,
        blob=blob,
    )
