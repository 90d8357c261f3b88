"""The bench's outputs: results.json, robustness.csv, report.md, the frontier and the grid.

The verdict is per metric: for each method, the attacker that reaches the highest SSIM, PSNR,
SRRA and replay cosine, each against the embedding-only floor (the highest value of any
attacker that sees only the clean embedding, or nothing). SSIM and PSNR measure appearance;
identity leakage is judged by SRRA and the replay cosine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advface.pipelines.reproduce.report import write_csvs, write_json

FLOORS = (
    "floor-embedding",
    "floor-embedding-ridge",
    "floor-embedding-inversion",
    "floor-mean-face",
)
#: The floors that decode the embedding in one pass (a trained and a closed-form decoder).
FLOOR_DECODERS = ("floor-embedding", "floor-embedding-ridge")
#: (method, attacker) rows that by construction see only the clean embedding e, or nothing.
#: Attackers of embedding-shadow are attackers of e too (its template is a function of e and
#: fresh randomness), but they are what the floor is compared with, so they are left out.
EMBEDDING_ONLY = frozenset(
    {(f, f) for f in FLOORS}
    | {("none", a) for a in ("embedding", "embedding-ridge", "embedding-inversion")}
)
#: Attackers that optimise an image (an adversarial image, not a decoder's one-pass face).
OPTIMISERS = frozenset({"inversion", "embedding-inversion", "floor-embedding-inversion"})
#: The verdict's metrics (higher is a stronger attacker) and how they are printed.
METRICS = {"ssim": "SSIM", "psnr": "PSNR", "srra": "SRRA", "replay_cosine": "replay cosine"}
IDENTITY_METRICS = ("srra", "replay_cosine")
FAR_UNAVAILABLE = "n/a (too few impostor pairs)"


def _recon(rows: list[dict], dataset: str) -> list[dict]:
    return [r for r in rows if r["dataset"] == dataset and r.get("ssim") is not None]


def _acc(rows: list[dict], dataset: str, method: str) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["dataset"] == dataset and r["method"] == method and r.get("accuracy") is not None
        ),
        None,
    )


def _best(sel: list[dict], metric: str, decoders_only: bool) -> dict | None:
    if decoders_only:
        sel = [r for r in sel if r["attacker"] not in OPTIMISERS]
    sel = [r for r in sel if r.get(metric) is not None]
    # Ties (100% SRRA) go to the row measured on more faces.
    return max(sel, key=lambda r: (r[metric], r.get("n_images") or 0)) if sel else None


def strongest(
    rows: list[dict], dataset: str, method: str, metric: str, *, decoders_only: bool = False
) -> dict | None:
    """The attacker row with the highest mean ``metric`` against ``method`` on ``dataset``
    (optimisation attackers left out with ``decoders_only``)."""
    sel = [r for r in _recon(rows, dataset) if r["method"] == method]
    return _best(sel, metric, decoders_only)


def embedding_floor(
    rows: list[dict], dataset: str, metric: str, *, decoders_only: bool = False
) -> dict | None:
    """The embedding-only floor of ``metric``: the row of the attacker, among those that see
    only the clean embedding or nothing (:data:`EMBEDDING_ONLY`), with the highest mean."""
    sel = [r for r in _recon(rows, dataset) if (r["method"], r["attacker"]) in EMBEDDING_ONLY]
    return _best(sel, metric, decoders_only)


def versus(row: dict, floor: dict, metric: str) -> str:
    """``above`` / ``below`` when ``row``'s 95% interval lies wholly above / below the
    floor's, ``at`` when they overlap; ``no interval`` when either has none (older results
    have no replay-cosine interval), which counts as no verdict."""
    a, b = row.get(f"{metric}_ci95"), floor.get(f"{metric}_ci95")
    if not (a and b):
        return "no interval"
    return "above" if a[0] > b[1] else "below" if a[1] < b[0] else "at"


def weak_floor_decoder(rows: list[dict], dataset: str) -> str | None:
    """Why the floor decoders cannot measure the floor, when the better of them (by mean SSIM)
    does no better than the mean face in SSIM (its interval reaches the mean face's); None
    when it does better."""
    get = {r["method"]: r for r in _recon(rows, dataset) if r["method"] in FLOORS}
    decs = [get[f] for f in FLOOR_DECODERS if f in get]
    mean = get.get("floor-mean-face")
    if not decs or mean is None:
        return None
    dec = max(decs, key=lambda r: r["ssim"])
    if versus(dec, mean, "ssim") == "above":
        return None
    return (
        f"The floor decoders are weak here: the better one ({dec['method']}, SSIM "
        f"{_ci(dec, 'ssim')}) is not above the mean face ({_ci(mean, 'ssim')}), an output with "
        "no information. They cannot show what the embedding gives (too little training or "
        'too few training images), so "at the floor" here means at this weak floor, and a '
        "target stated against it (within 0.03 of the floor) cannot be tested on this run."
    )


def _fmt(metric: str, value: float) -> str:
    if metric == "srra":
        return f"{100 * value:.1f}%"
    return f"{value:.2f}" if metric == "psnr" else f"{value:.3f}"


def _cell(r: dict, metric: str, n_all: int, floor: dict | None = None) -> str:
    """Value, attacker, (n) when measured on fewer faces than the others, and the verdict."""
    n = f" (n={r['n_images']})" if r.get("n_images", n_all) < n_all else ""
    verdict = f": {versus(r, floor, metric)}" if floor is not None else ""
    return f"{_fmt(metric, r[metric])} {r['attacker']}{n}{verdict}"


def _methods(rows: list[dict], dataset: str) -> list[str]:
    return [m for m in dict.fromkeys(r["method"] for r in _recon(rows, dataset)) if m not in FLOORS]


def identity_beyond_floor(
    rows: list[dict], dataset: str, method: str, *, decoders_only: bool = False
) -> bool:
    """Whether some attacker's SRRA or replay cosine lies above the embedding-only floor."""
    for metric in IDENTITY_METRICS:
        best = strongest(rows, dataset, method, metric, decoders_only=decoders_only)
        floor = embedding_floor(rows, dataset, metric, decoders_only=decoders_only)
        if best and floor and versus(best, floor, metric) == "above":
            return True
    return False


def _floor_attackers(rows: list[dict], dataset: str) -> str:
    present = [
        f"`{a}`" if m == a else f"`{a}` against `{m}`"
        for r in _recon(rows, dataset)
        if (m := r["method"], a := r["attacker"]) in EMBEDDING_ONLY
    ]
    return ", ".join(present)


def verdict_table(rows: list[dict], dataset: str, *, decoders_only: bool = False) -> list[str]:
    """Per method, the strongest attacker by each metric against the embedding-only floor."""
    n_all = max((r.get("n_images") or 0 for r in _recon(rows, dataset)), default=0)
    floors = {m: embedding_floor(rows, dataset, m, decoders_only=decoders_only) for m in METRICS}
    lines = [
        "| method | " + " | ".join(METRICS.values()) + " |",
        "| --- |" + " --- |" * len(METRICS),
        "| embedding-only floor | "
        + " | ".join(_cell(f, m, n_all) if f else "—" for m, f in floors.items())
        + " |",
    ]
    for method in _methods(rows, dataset):
        cells = []
        for m, floor in floors.items():
            best = strongest(rows, dataset, method, m, decoders_only=decoders_only)
            cells.append(_cell(best, m, n_all, floor) if best else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    leak = [
        m
        for m in _methods(rows, dataset)
        if identity_beyond_floor(rows, dataset, m, decoders_only=decoders_only)
    ]
    lines += [
        "",
        "Identity beyond the embedding-only floor (SRRA or replay cosine above it): "
        + (", ".join(f"`{m}`" for m in leak) if leak else "no method")
        + ".",
    ]
    return lines


def write_figures(out: Path, rows: list[dict], grids: dict[str, dict[str, np.ndarray]]) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from advface.pipelines.reproduce.figures import image_grid

    files = []
    for d, cols in grids.items():
        path = out / f"grid_{d}.png"
        image_grid(cols, path, f"{d}: originals, floors, then each protection | attacker")
        files.append(path.name)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for d in sorted({r["dataset"] for r in rows}):
        for m in _methods(rows, d):
            best, acc = strongest(rows, d, m, "ssim"), _acc(rows, d, m)
            if best and acc:
                ax.scatter(100 * acc["accuracy"], best["ssim"], label=f"{d} {m}")
                ax.annotate(m, (100 * acc["accuracy"], best["ssim"]), fontsize=6)
        for f, style in zip(FLOORS, ("--", (0, (5, 1)), "-.", ":"), strict=True):
            fl = strongest(rows, d, f, "ssim")
            if fl:
                ax.axhline(fl["ssim"], ls=style, lw=1, color="grey")
                ax.annotate(f"{d} {f}", (ax.get_xlim()[0], fl["ssim"]), fontsize=6)
    ax.set_xlabel("verification accuracy, stored side protected (%)")
    ax.set_ylabel("highest SSIM of any attacker (appearance only)")
    ax.set_title("privacy vs accuracy (lower is more private)", fontsize=9)
    ax.legend(fontsize=5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "frontier.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path.name, *files]


def _ci(r: dict, k: str, scale: float = 1.0, digits: int = 3) -> str:
    lo, hi = r.get(f"{k}_ci95") or (None, None)
    v = f"{scale * r[k]:.{digits}f}"
    return v if lo is None else f"{v} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def _srra_far(r: dict) -> str:
    return FAR_UNAVAILABLE if r.get("srra_far") is None else f"{100 * r['srra_far']:.1f}%"


def _header(meta: dict) -> list[str]:
    p = meta["profile"]
    commit = meta.get("git_commit") or "not recorded"
    lines = [
        f"# Robustness bench — profile `{p['name']}`",
        "",
        f"Device: {meta['device']} ({meta['machine']}); wall time {meta['wall_s']} s; "
        f"code: commit {commit}.",
        *(f"> {n}" for n in p["notes"]),
        "",
        "Attackers train on LFW people outside the test folds 1-5 and outside CFP's 500 people "
        f"({meta['splits']['attacker']['images']} images of "
        f"{meta['splits']['attacker']['people']} people; identity overlap with every test set: "
        "0, checked by name). The server's shadow and generator train on CelebA's server half "
        f"({meta['splits']['server']['images']} images of {meta['splits']['server']['people']} "
        "people). Identity overlap between the server's people and the attackers' or the test "
        "people is unchecked: CelebA's ids are anonymous, LFW's and CFP's are names.",
        "",
    ]
    same = meta.get("attacker_training")
    if same:
        flip = (
            "with horizontal flips (adaptive attackers protect the mirrored images too)"
            if same.get("flip")
            else "without flips"
        )
        budget = same.get("max_minutes")
        lines += [
            f"Every attacker ({', '.join(same['attackers'])}) trains on the same "
            f"{same['n_train']} images ({same['train_set']}, sha256 {same['data_sha256']}) "
            f"{flip}, {same['epochs_setting']} epoch{'' if same['epochs_setting'] == 1 else 's'}"
            + (f" or {60 * budget:g} s" if budget else "")
            + " each (checked when each trains)."
            + _closed_form_note(meta, same),
            "",
        ]
    else:
        lines += [
            "Attacker training settings: not recorded as one record by the code that made this "
            "run; see the training records below.",
            "",
        ]
    return lines


def _closed_form_note(meta: dict, same: dict) -> str:
    """The closed-form attackers' sentence: same images, the ridge strength cross-validation
    chose (empty when the run has none)."""
    parts = []
    for role in same.get("closed_form") or []:
        t = meta["training"].get(role, {})
        lam, folds = t.get("lambda"), t.get("folds")
        chosen = f"; {folds}-fold cross-validation chose lambda {lam:g}" if lam is not None else ""
        parts.append(f"{role} (ridge regression{chosen})")
    if not parts:
        return ""
    return (
        f" {', '.join(parts)} {'is' if len(parts) == 1 else 'are'} fit in closed form on the "
        "same images and embeddings: no epochs, no budget."
    )


def _protections_section(meta: dict) -> list[str]:
    """The server's protection settings, one bullet each."""
    if not meta.get("protections"):
        return []
    lines = [
        "Protections (the server's settings; `dp` is Laplace noise of scale "
        "b = sensitivity / epsilon_dp on every element):",
        "",
    ]
    for m, prm in meta["protections"].items():
        shown = {k: v for k, v in prm.items() if not k.endswith("sha256") and k != "name"}
        lines.append(f"- `{m}`: {shown}")
    lines.append("")
    return lines


def _dataset_section(rows: list[dict], d: str) -> list[str]:
    """One dataset: attackers' table, chance levels, verdicts against the floor, accuracy."""
    recon = _recon(rows, d)
    lines = [
        f"## {d}",
        "",
        "| method | attacker | SSIM [95% CI] | PSNR | MSE | SRRA [95% CI] | SRRA@FAR1e-3 | "
        "replay cosine | n |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in recon:
        lines.append(
            f"| {r['method']} | {r['attacker']} | {_ci(r, 'ssim')} | {r['psnr']:.2f} | "
            f"{r['mse']:.4f} | {_ci(r, 'srra', 100, 1)}% | {_srra_far(r)} | "
            f"{_ci(r, 'replay_cosine') if r.get('replay_cosine') is not None else '—'} | "
            f"{r['n_images']} |"
        )
    ch = recon[0]
    if ch.get("threshold_far") is None:
        n_imp = ch.get("impostor_pairs", "fewer than 1,000")
        far = (
            f"no FAR = 1e-3 threshold ({n_imp} impostor pairs; it needs 1,000), so "
            f"SRRA@FAR1e-3 reads {FAR_UNAVAILABLE}"
        )
    else:
        far = (
            f"{100 * ch['chance_srra_far']:.2f}% at the FAR=1e-3 threshold "
            f"{ch['threshold_far']:.3f}"
        )
    lines += [
        "",
        f"Chance SRRA (impostor pairs accepted): {100 * ch['chance_srra']:.2f}% at "
        f"the operating threshold {ch['threshold']:.3f}; {far}.",
        "",
        "### Strongest attacker per metric, against the embedding-only floor",
        "",
        "Each cell: the highest mean any attacker reaches against the method, which "
        "attacker, and where it stands against the embedding-only floor (the highest mean "
        "of the attackers that see only the clean embedding, or nothing: "
        f"{_floor_attackers(rows, d)}): above / below = "
        "its 95% interval lies wholly above / below the floor's, at = they overlap. "
        "(n=...) marks a value measured on the first n test faces only (the optimisation "
        "attackers), a smaller set than the others'. SSIM and PSNR measure appearance; "
        "a reconstruction below the mean face in SSIM can still be accepted as the person, "
        "so identity is judged by SRRA and the replay cosine.",
        "",
        "Any attacker (the floor holds an optimiser of the embedding alone, so an "
        "identity verdict above it means more than the replay every stored embedding "
        "allows):",
        "",
        *verdict_table(rows, d),
        "",
        "Decoders only (one pass through a trained network, a face rather than an image "
        "optimised against FaceNet):",
        "",
        *verdict_table(rows, d, decoders_only=True),
        "",
    ]
    weak = weak_floor_decoder(rows, d)
    if weak:
        lines += [weak, ""]
    return lines + _accuracy_table(rows, d)


def _accuracy_table(rows: list[dict], d: str) -> list[str]:
    """Verification accuracy per method on dataset ``d`` (stored side protected)."""
    accs = [a for m in dict.fromkeys(r["method"] for r in rows) if (a := _acc(rows, d, m))]
    wilson = all("accuracy_ci95_folds" in a for a in accs)
    lines = [
        "| method | accuracy [95% CI"
        + (", Wilson over pairs" if wilson else ", normal over folds (older results)")
        + "] | pairs | stored-vs-clean cosine |",
        "| --- | --- | --- | --- |",
    ]
    for a in accs:
        lines.append(
            f"| {a['method']} | {_ci(a, 'accuracy', 100, 2)} | {a['n_pairs']}"
            f"{' (full)' if a['full_protocol'] else ' (sample)'} | "
            f"{a['stored_identity_cosine']:.3f} |"
        )
    lines.append("")
    return lines


def _training_section(meta: dict) -> list[str]:
    """Each trained network: its data, budget, identity overlap and loss curve."""
    lines = [
        "## Training records",
        "",
        "| network | train set | n | flips | epochs | wall s (budget clock s) | "
        "identity overlap with test | L1 curve (per epoch) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for role, t in meta["training"].items():
        curve = ", ".join(f"{v:.4f}" for v in t["loss_curve"])
        if t.get("closed_form"):
            cv = t.get("cv_mse") or {}
            curve = f"ridge lambda {t.get('lambda', 0):g}, CV MSE {min(cv.values(), default=0):.4f}"
        overlap = t["identity_overlap_with_test"]
        if overlap is None and role.startswith("server"):
            overlap = "unchecked (CelebA)"
        lines.append(
            f"| {role} | {t['train_set']} | {t['n_train']} | {t.get('flip', '—')} | "
            f"{t['epochs']} | {t['seconds']} ({t.get('budget_seconds', '—')}) | "
            f"{overlap} | {curve} |"
        )
    return lines


def render(meta: dict, rows: list[dict]) -> str:
    lines = _header(meta) + _protections_section(meta)
    for d in sorted({r["dataset"] for r in rows}):
        lines += _dataset_section(rows, d)
    lines += _training_section(meta)
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """Per dataset and method: accuracy and the strongest attacker by SSIM and by SRRA (the
    CLI's printout)."""
    head = ("dataset", "method", "accuracy", "highest SSIM (attacker)", "highest SRRA (attacker)")
    out = ["{:8} {:26} {:>8}  {:35} {}".format(*head)]
    for d in dict.fromkeys(r["dataset"] for r in rows):
        for m in dict.fromkeys(r["method"] for r in _recon(rows, d)):
            s, i = strongest(rows, d, m, "ssim"), strongest(rows, d, m, "srra")
            a = _acc(rows, d, m)
            acc = f"{100 * a['accuracy']:.2f}%" if a else "-"
            ssim = f"{s['ssim']:.3f} ({s['attacker']})"
            srra = f"{100 * i['srra']:.1f}% ({i['attacker']})"
            out.append(f"{d:8} {m:26} {acc:>8}  {ssim:35} {srra}")
    return "\n".join(out)


def is_bench_results(data: object) -> bool:
    """Whether a parsed results.json is the bench's (every row ``table: "robustness"``)."""
    rows = data.get("rows") if isinstance(data, dict) else None
    return bool(rows) and all(isinstance(r, dict) and r.get("table") == "robustness" for r in rows)


def rerender(folder: Path, data: dict) -> Path:
    """Write ``folder``'s report.md and robustness.csv again from its parsed results.json
    ``data`` with this renderer (no computation; results.json is not touched). Results the
    renderer cannot read are a ValueError naming the file, and nothing is written."""
    from advface.pipelines.reproduce.report import _atomic_write, render_checked

    path = folder / "results.json"
    if not is_bench_results(data):
        raise ValueError(f"{path} holds no bench results (rows with table 'robustness')")
    meta = dict(data)
    rows = meta.pop("rows")
    text = render_checked(path, render, meta, rows)
    write_csvs(folder, rows)
    _atomic_write(folder / "report.md", text)
    return folder / "report.md"


def write_all(out: Path, meta: dict, rows: list[dict]) -> None:
    from advface.pipelines.reproduce.report import _atomic_write

    write_json(out / "results.json", meta, rows)
    write_csvs(out, rows)
    _atomic_write(out / "report.md", render(meta, rows))
