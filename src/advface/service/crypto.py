"""Encryption at rest: AES-256-GCM under a data key per subject, wrapped by a master key.

Every stored feature map and embedding is sealed with its subject's data key; the tenant,
subject, template and a purpose label are the associated data, so a row copied to another
tenant, subject or template (or column) fails to authenticate. Data keys are stored wrapped
(AES-GCM) by the master key that a :class:`KeyProvider` holds; deleting a subject deletes its
wrapped key, after which every copy of its rows (WAL, backups, replicas) is unreadable even to
someone holding the master key. A KMS plugs in as another ``KeyProvider``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("advface.service")

# Sealed values start with this marker; the payload format starts with b"AFZ1" and an
# embedding written in clear (before encryption was on) is raw float32 of a fixed length.
SEALED = b"AFX1"
_NONCE = 12
KEY_BYTES = 32
MASTER_KEY_ENV = "ADVFACE_MASTER_KEY"
MASTER_KEY_FILE_ENV = "ADVFACE_MASTER_KEY_FILE"
DEFAULT_KEY_NAME = "master.key"


class CryptoError(ValueError):
    """Base class of the encryption errors (a ``ValueError``: bad configuration or data)."""


class DecryptionError(CryptoError):
    """A sealed value does not authenticate: wrong key, or a row copied or tampered with."""


class MasterKeyError(CryptoError):
    """The master key is missing, malformed or not the one the database's keys are under."""


def key_id(key: bytes) -> str:
    """Public fingerprint of a master key (stored beside each wrapped key; reveals nothing)."""
    return hmac.new(key, b"advface master key id", hashlib.sha256).hexdigest()[:16]


class KeyProvider(ABC):
    """Wraps and unwraps data keys under a master key (a local key, or a KMS later)."""

    @property
    @abstractmethod
    def key_id(self) -> str:
        """Fingerprint of the master key that :meth:`wrap` uses."""

    @abstractmethod
    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Encrypt ``data_key``, bound to ``context``."""

    @abstractmethod
    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt a wrapped key; :class:`DecryptionError` when it does not authenticate."""


class LocalKeyProvider(KeyProvider):
    """A 256-bit master key held in memory (read from a file or an environment variable)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise MasterKeyError(f"the master key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead, self._id = AESGCM(key), key_id(key)

    @property
    def key_id(self) -> str:
        return self._id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, data_key, b"wrap|" + context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], b"wrap|" + context)
        except InvalidTag:
            raise DecryptionError("a data key does not unwrap under this master key") from None


def aad(purpose: str, tenant_id: int, subject_pk: int, template_id: str = "") -> bytes:
    """Associated data: what a sealed value belongs to (unambiguous: a JSON list)."""
    return json.dumps([purpose, int(tenant_id), int(subject_pk), template_id]).encode()


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(data_key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return SEALED + nonce + AESGCM(data_key).encrypt(nonce, plaintext, associated)


def is_sealed(value: bytes) -> bool:
    return value[:4] == SEALED


def open_sealed(data_key: bytes, value: bytes, associated: bytes) -> bytes:
    """Decrypt a :func:`seal` output; :class:`DecryptionError` if it does not authenticate."""
    if not is_sealed(value):
        raise DecryptionError("value is not sealed")
    body = value[len(SEALED) :]
    try:
        return AESGCM(data_key).decrypt(body[:_NONCE], body[_NONCE:], associated)
    except InvalidTag:
        raise DecryptionError(
            "stored data does not authenticate for this tenant, subject and template "
            "(copied or altered row)"
        ) from None


def parse_key(text: str, source: str) -> bytes:
    """A master key written as base64 (or 64 hex digits)."""
    s = text.strip()
    try:
        key = bytes.fromhex(s) if len(s) == 2 * KEY_BYTES else base64.b64decode(s, validate=True)
    except (ValueError, binascii.Error):
        raise MasterKeyError(f"{source}: not a base64 or hex master key") from None
    if len(key) != KEY_BYTES:
        raise MasterKeyError(f"{source}: the master key must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def read_key_file(path: Path) -> bytes:
    if not path.is_file():
        raise MasterKeyError(f"master key file {path} does not exist")
    if path.stat().st_mode & 0o077:
        log.warning("master key file %s is readable by others; chmod 600 it", path)
    return parse_key(path.read_text(), str(path))


def write_key_file(path: Path) -> bytes:
    """Create a new random master key file (mode 0600; never overwrites one). The key is
    written and synced under a temporary name and hard-linked into place, so a failed write
    never leaves an empty or partial key file behind."""
    key = new_data_key()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        raise FileExistsError(f"master key file {path} exists; it is never overwritten")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(key).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic; fails rather than replace a key created meanwhile
    finally:
        tmp.unlink(missing_ok=True)
    return key


def provider_from_config(
    key_file: str = "", env: dict[str, str] | None = None, default_file: Path | None = None
) -> KeyProvider | None:
    """The configured master key: ``$ADVFACE_MASTER_KEY`` (base64), else ``key_file``
    (or ``$ADVFACE_MASTER_KEY_FILE``), else ``default_file`` when it exists, else ``None``."""
    env = dict(os.environ if env is None else env)
    if env.get(MASTER_KEY_ENV):
        return LocalKeyProvider(parse_key(env[MASTER_KEY_ENV], MASTER_KEY_ENV))
    path = key_file or env.get(MASTER_KEY_FILE_ENV, "")
    if path:
        return LocalKeyProvider(read_key_file(Path(path)))
    if default_file is not None and default_file.is_file():
        return LocalKeyProvider(read_key_file(default_file))
    return None
