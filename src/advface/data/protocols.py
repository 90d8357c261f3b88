"""Dataset layouts and verification protocols: LFW View 2, CFP-FP / CFP-FF, CelebA, folders.

Keys are POSIX paths relative to each dataset's image folder:

- LFW: ``<root>/lfw/lfw-deepfunneled``, keys like ``Aaron_Eckhart/Aaron_Eckhart_0001.jpg``;
- CFP: ``<root>/cfp/Data/Images``, keys like ``001/frontal/01.jpg``;
- CelebA crops: ``<root>/celeba/img_mtcnn160``, keys like ``000093.jpg``;
- a folder of identities: ``<folder>/<identity>/<image>``, keys ``<identity>/<image>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "PROTOCOLS",
    "PairProtocol",
    "celeba_image_dir",
    "celeba_keys",
    "cfp_image_dir",
    "cfp_keys",
    "folder_identities",
    "lfw_image_dir",
    "lfw_keys",
    "lfw_nonpair_keys",
    "load_protocol",
]

PROTOCOLS = ("lfw", "cfp-fp", "cfp-ff")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class PairProtocol:
    """A pair-verification protocol: pair ``i`` compares ``keys_a[i]`` with ``keys_b[i]``.

    ``issame`` is bool (n,), ``fold`` int (n,) in 0..9; ``image_dir`` is the folder the keys are
    relative to.
    """

    name: str
    keys_a: list[str]
    keys_b: list[str]
    issame: np.ndarray
    fold: np.ndarray
    image_dir: Path | None = None

    def __post_init__(self) -> None:
        n = len(self.keys_a)
        if len(self.keys_b) != n or self.issame.shape != (n,) or self.fold.shape != (n,):
            raise ValueError(f"protocol {self.name}: keys_a, keys_b, issame, fold differ in length")

    def __len__(self) -> int:
        return len(self.keys_a)

    @property
    def n_folds(self) -> int:
        return int(self.fold.max()) + 1 if len(self) else 0

    def unique_keys(self) -> list[str]:
        """Sorted distinct image keys used by the pairs."""
        return sorted(set(self.keys_a) | set(self.keys_b))


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_lines(path: Path) -> list[str]:
    """Lines of a text file with line endings (incl. CRLF) stripped."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc})") from exc


def _list_images(folder: Path) -> list[str]:
    """All image files below ``folder`` as sorted POSIX keys relative to it."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


# ----------------------------------------------------------------------------- LFW


def lfw_image_dir(root: str | Path) -> Path:
    """``<root>/lfw/lfw-deepfunneled``."""
    return _require_dir(Path(root) / "lfw" / "lfw-deepfunneled", "LFW image folder")


def lfw_keys(root: str | Path) -> list[str]:
    """All LFW images (``Name/Name_NNNN.jpg``), sorted."""
    return _list_images(lfw_image_dir(root))


def _lfw_key(name: str, index: str, path: Path, lineno: int) -> str:
    try:
        i = int(index)
    except ValueError:
        raise ValueError(
            f"{path}, line {lineno}: image number {index!r} is not an integer"
        ) from None
    if i < 1:
        raise ValueError(f"{path}, line {lineno}: image number {i} must be >= 1")
    return f"{name}/{name}_{i:04d}.jpg"


def _load_lfw(root: Path, check_files: bool) -> PairProtocol:
    path = _require_file(root / "lfw" / "pairs.txt", "LFW pairs file")
    lines = _read_lines(path)
    if not lines:
        raise ValueError(f"{path}, line 1: empty file (expected a header like '10 300')")
    head = lines[0].split()
    if len(head) != 2 or not all(h.isdigit() for h in head):
        raise ValueError(f"{path}, line 1: expected '<folds> <pairs per class>', got {lines[0]!r}")
    n_folds, per_class = int(head[0]), int(head[1])
    expected = n_folds * 2 * per_class
    body = [(i + 2, line) for i, line in enumerate(lines[1:]) if line.strip()]
    if len(body) != expected:
        raise ValueError(
            f"{path}: header promises {n_folds} folds x {2 * per_class} pairs = {expected} lines, "
            f"found {len(body)}"
        )
    keys_a: list[str] = []
    keys_b: list[str] = []
    issame = np.zeros(expected, dtype=bool)
    fold = np.zeros(expected, dtype=np.int64)
    for k, (lineno, line) in enumerate(body):
        f, within = divmod(k, 2 * per_class)
        same = within < per_class  # each fold: matched pairs first, then mismatched
        parts = line.split()
        if same:
            if len(parts) != 3:
                raise ValueError(
                    f"{path}, line {lineno}: expected a matched pair 'name i j', got {line!r}"
                )
            a = _lfw_key(parts[0], parts[1], path, lineno)
            b = _lfw_key(parts[0], parts[2], path, lineno)
        else:
            if len(parts) != 4:
                raise ValueError(
                    f"{path}, line {lineno}: expected a mismatched pair 'name1 i name2 j', "
                    f"got {line!r}"
                )
            a = _lfw_key(parts[0], parts[1], path, lineno)
            b = _lfw_key(parts[2], parts[3], path, lineno)
        keys_a.append(a)
        keys_b.append(b)
        issame[k] = same
        fold[k] = f
    image_dir = root / "lfw" / "lfw-deepfunneled"
    if check_files:
        _check_keys_exist(image_dir, keys_a + keys_b, "LFW")
    return PairProtocol("lfw", keys_a, keys_b, issame, fold, image_dir)


def lfw_nonpair_keys(root: str | Path) -> list[str]:
    """LFW images used by no View 2 pair (5,532 on the official data), sorted."""
    used = set(_load_lfw(Path(root), check_files=False).unique_keys())
    return [k for k in lfw_keys(root) if k not in used]


# ----------------------------------------------------------------------------- CFP

_CFP_PREFIX = PurePosixPath("../Data/Images")


def cfp_image_dir(root: str | Path) -> Path:
    """``<root>/cfp/Data/Images``."""
    return _require_dir(Path(root) / "cfp" / "Data" / "Images", "CFP image folder")


def _cfp_pair_list(path: Path) -> dict[int, str]:
    """Index -> key (relative to Data/Images) from Pair_list_F.txt / Pair_list_P.txt."""
    _require_file(path, "CFP pair list")
    out: dict[int, str] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}, line {lineno}: expected '<index> <path>', got {line!r}")
        rel = PurePosixPath(parts[1].replace("\\", "/"))
        try:
            key = rel.relative_to(_CFP_PREFIX).as_posix()
        except ValueError:
            raise ValueError(
                f"{path}, line {lineno}: path {parts[1]!r} is not under {_CFP_PREFIX}/"
            ) from None
        idx = int(parts[0])
        if idx in out:
            raise ValueError(f"{path}, line {lineno}: index {idx} appears twice")
        out[idx] = key
    if not out:
        raise ValueError(f"{path}: no entries")
    return out


def cfp_keys(root: str | Path) -> list[str]:
    """All CFP images listed in Pair_list_F.txt and Pair_list_P.txt, sorted."""
    proto = Path(root) / "cfp" / "Protocol"
    f = _cfp_pair_list(proto / "Pair_list_F.txt")
    p = _cfp_pair_list(proto / "Pair_list_P.txt")
    return sorted(set(f.values()) | set(p.values()))


def _load_cfp(root: Path, which: str, check_files: bool) -> PairProtocol:
    proto = root / "cfp" / "Protocol"
    first = _cfp_pair_list(proto / "Pair_list_F.txt")
    second = first if which == "FF" else _cfp_pair_list(proto / "Pair_list_P.txt")
    split_dir = _require_dir(proto / "Split" / which, f"CFP split folder {which}")
    keys_a: list[str] = []
    keys_b: list[str] = []
    same_l: list[bool] = []
    fold_l: list[int] = []
    for f in range(10):
        for kind, same in (("same", True), ("diff", False)):
            path = _require_file(split_dir / f"{f + 1:02d}" / f"{kind}.txt", "CFP split file")
            for lineno, line in enumerate(_read_lines(path), start=1):
                if not line.strip():
                    continue
                parts = line.replace(" ", "").split(",")
                if len(parts) != 2 or not all(p.isdigit() for p in parts):
                    raise ValueError(f"{path}, line {lineno}: expected 'i,j', got {line!r}")
                i, j = int(parts[0]), int(parts[1])
                if i not in first:
                    raise ValueError(f"{path}, line {lineno}: index {i} not in Pair_list_F.txt")
                if j not in second:
                    src = "Pair_list_F.txt" if which == "FF" else "Pair_list_P.txt"
                    raise ValueError(f"{path}, line {lineno}: index {j} not in {src}")
                keys_a.append(first[i])
                keys_b.append(second[j])
                same_l.append(same)
                fold_l.append(f)
    image_dir = root / "cfp" / "Data" / "Images"
    if check_files:
        _check_keys_exist(image_dir, keys_a + keys_b, "CFP")
    name = "cfp-" + which.lower()
    return PairProtocol(
        name, keys_a, keys_b, np.array(same_l, dtype=bool), np.array(fold_l, np.int64), image_dir
    )


# ----------------------------------------------------------------------------- common


def _check_keys_exist(image_dir: Path, keys: list[str], what: str) -> None:
    _require_dir(image_dir, f"{what} image folder")
    missing = [k for k in dict.fromkeys(keys) if not (image_dir / k).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{what}: {len(missing)} image(s) named by the protocol are missing under "
            f"{image_dir}: {', '.join(missing[:3])}{more}"
        )


def load_protocol(name: str, root: str | Path, *, check_files: bool = True) -> PairProtocol:
    """Load ``"lfw"`` (View 2, 6,000 pairs), ``"cfp-fp"`` or ``"cfp-ff"`` (7,000 pairs each).

    ``root`` is the data root holding ``lfw/`` and ``cfp/``. With ``check_files`` every image the
    protocol names must exist.
    """
    root = Path(root)
    key = name.lower()
    if key == "lfw":
        return _load_lfw(root, check_files)
    if key in ("cfp-fp", "cfp-ff"):
        return _load_cfp(root, key[-2:].upper(), check_files)
    raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")


# ----------------------------------------------------------------------------- CelebA


def celeba_image_dir(root: str | Path) -> Path:
    """``<root>/celeba/img_mtcnn160``."""
    return _require_dir(Path(root) / "celeba" / "img_mtcnn160", "CelebA crop folder")


def celeba_keys(root: str | Path) -> tuple[list[str], np.ndarray]:
    """CelebA crops present on disk (minus ``no_face.txt``) and their identities (int64)."""
    base = Path(root) / "celeba"
    image_dir = celeba_image_dir(root)
    id_path = _require_file(base / "identity_CelebA.txt", "CelebA identity file")
    ident: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(id_path), start=1):
        parts = line.split()
        if not parts:
            continue
        if lineno == 1 and not parts[-1].lstrip("-").isdigit():
            continue  # optional header line, e.g. "image identity"
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(
                f"{id_path}, line {lineno}: expected '<file> <identity>', got {line!r}"
            )
        ident[parts[0]] = int(parts[1])
    no_face_path = base / "no_face.txt"
    no_face = set()
    if no_face_path.is_file():
        no_face = {ln.strip() for ln in _read_lines(no_face_path) if ln.strip()}
    keys = [k for k in _list_images(image_dir) if k not in no_face]
    unknown = [k for k in keys if k not in ident]
    if unknown:
        raise ValueError(
            f"{len(unknown)} CelebA crop(s) have no identity in {id_path}, e.g. {unknown[0]}"
        )
    return keys, np.array([ident[k] for k in keys], dtype=np.int64)


# ----------------------------------------------------------------------------- folders


def folder_identities(folder: str | Path) -> tuple[list[str], list[str]]:
    """Images of a ``<folder>/<identity>/<image>`` tree: sorted keys and each key's identity."""
    folder = _require_dir(Path(folder), "image folder")
    keys = [
        k
        for k in _list_images(folder)
        if len(PurePosixPath(k).parts) == 2 and not PurePosixPath(k).parts[0].startswith(".")
    ]
    if not keys:
        raise ValueError(f"{folder}: no images in <identity>/<image> layout")
    return keys, [PurePosixPath(k).parts[0] for k in keys]
