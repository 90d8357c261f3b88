"""Per-tenant API keys: high-entropy secrets, stored only as SHA-256 digests.

A key looks like ``afk_<key_id>_<secret>``. ``key_id`` (public, 12 hex chars) indexes the row;
``secret`` carries 256 random bits, so a fast hash is enough (no password stretching needed:
there is nothing to brute-force) and the digest comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "afk"
API_KEY_HEADER = "X-API-Key"
# The version of E that computed an uploaded feature map (optional): the service refuses a map
# of another E, whose templates would match nothing.
MODEL_HEADER = "X-Advface-Model"
_KEY_RE = re.compile(r"^afk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key: ``token`` is shown once, ``digest`` is what gets stored."""

    key_id: str
    token: str
    digest: str


def digest(token: str) -> str:
    """Hex SHA-256 of the whole token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_key() -> NewKey:
    """Create a new random API key."""
    key_id = secrets.token_hex(6)
    token = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key_id=key_id, token=token, digest=digest(token))


def parse_key_id(token: str) -> str | None:
    """Return the key id of a well-formed token, else ``None``."""
    m = _KEY_RE.match(token)
    return m.group(1) if m else None


def matches(token: str, stored_digest: str) -> bool:
    """Constant-time check of ``token`` against a stored digest."""
    return hmac.compare_digest(digest(token), stored_digest)
