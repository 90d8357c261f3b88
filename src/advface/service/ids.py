"""Subject and template ids: one canonical spelling, and nothing a URL path could misread."""

from __future__ import annotations

import re
import unicodedata

# Letters and digits of any script, plus a few punctuation marks common in ids and e-mails.
SUBJECT_ID_RE = re.compile(r"[\w.@:'+-]{1,128}")
# Server-made (uuid4 hex) but looked up by clients: keep lookups to this shape.
TEMPLATE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
SUBJECT_ID_HELP = (
    "1-128 letters, digits or . _ @ : ' + -, not only dots; stored in Unicode NFC form"
)


def normalise_subject_id(raw: str) -> str:
    """The NFC form of a valid subject id; ``ValueError`` with the reason otherwise.

    NFC makes two spellings of one name (precomposed "é" and "e" + combining accent) one subject.
    Ids made only of dots are refused: "." and ".." are path segments to URL resolvers, so a
    request for them can reach a different resource than the one named.
    """
    if not isinstance(raw, str):
        raise ValueError("subject id must be a string")
    sid = unicodedata.normalize("NFC", raw)
    if not SUBJECT_ID_RE.fullmatch(sid):
        raise ValueError(f"invalid subject id: {SUBJECT_ID_HELP}")
    if not sid.strip("."):
        raise ValueError("invalid subject id: an id cannot consist of dots only")
    return sid


def check_template_id(raw: str) -> str:
    """``raw`` if it has the shape of a template id, else ``ValueError``."""
    if not isinstance(raw, str) or not TEMPLATE_ID_RE.fullmatch(raw):
        raise ValueError("invalid template id: 1-64 letters, digits, _ or -")
    return raw
