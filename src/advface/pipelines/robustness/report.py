"""The bench's outputs: results.json, robustness.csv, report.md, the frontier and the grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advface.pipelines.reproduce.report import write_csvs, write_json

FLOORS = ("floor-embedding", "floor-embedding-inversion", "floor-mean-face")


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


def strongest(rows: list[dict], dataset: str, method: str) -> dict | None:
    """The attacker with the highest mean SSIM against ``method`` on ``dataset``."""
    sel = [r for r in _recon(rows, dataset) if r["method"] == method]
    return max(sel, key=lambda r: r["ssim"]) if sel else None


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
        for m in sorted({r["method"] for r in _recon(rows, d)} - set(FLOORS)):
            best, acc = strongest(rows, d, m), _acc(rows, d, m)
            if best and acc:
                ax.scatter(100 * acc["accuracy"], best["ssim"], label=f"{d} {m}")
                ax.annotate(m, (100 * acc["accuracy"], best["ssim"]), fontsize=6)
        for f, style in zip(FLOORS, ("--", "-.", ":"), strict=True):
            fl = strongest(rows, d, f)
            if fl:
                ax.axhline(fl["ssim"], ls=style, lw=1, color="grey")
                ax.annotate(f"{d} {f}", (ax.get_xlim()[0], fl["ssim"]), fontsize=6)
    ax.set_xlabel("verification accuracy, stored side protected (%)")
    ax.set_ylabel("SSIM of the strongest attacker")
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


def render(meta: dict, rows: list[dict]) -> str:
    p = meta["profile"]
    lines = [
        f"# Robustness bench — profile `{p['name']}`",
        "",
        f"Device: {meta['device']} ({meta['machine']}); wall time {meta['wall_s']} s.",
        *(f"> {n}" for n in p["notes"]),
        "",
        "Attackers train on LFW people outside the test folds 1-5 and outside CFP's 500 people "
        f"({meta['splits']['attacker']['images']} images of "
        f"{meta['splits']['attacker']['people']} people; identity overlap with every test set: "
        "0, checked by name). The server's shadow and generator train on CelebA's server half "
        f"({meta['splits']['server']['images']} images of {meta['splits']['server']['people']} "
        "people, disjoint by identity id from CelebA's attacker half; CelebA's anonymous ids "
        "cannot be checked against LFW/CFP names).",
        "",
    ]
    if meta.get("protections"):
        lines += [
            "Protections (the server's settings; `dp` is Laplace noise of scale "
            "b = sensitivity / epsilon_dp on every element):",
            "",
        ]
        for m, prm in meta["protections"].items():
            shown = {k: v for k, v in prm.items() if not k.endswith("sha256") and k != "name"}
            lines.append(f"- `{m}`: {shown}")
        lines.append("")
    for d in sorted({r["dataset"] for r in rows}):
        lines += [
            f"## {d}",
            "",
            "| method | attacker | SSIM [95% CI] | PSNR | MSE | SRRA | SRRA@FAR1e-3 | n |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in _recon(rows, d):
            lines.append(
                f"| {r['method']} | {r['attacker']} | {_ci(r, 'ssim')} | {r['psnr']:.2f} | "
                f"{r['mse']:.4f} | {100 * r['srra']:.1f}% | {100 * r['srra_far']:.1f}% | "
                f"{r['n_images']} |"
            )
        ch = _recon(rows, d)[0]
        lines += [
            "",
            f"Chance SRRA (impostor pairs accepted): {100 * ch['chance_srra']:.2f}% at "
            f"the operating threshold {ch['threshold']:.3f}, "
            f"{100 * ch['chance_srra_far']:.2f}% at the FAR=1e-3 threshold "
            f"{ch['threshold_far']:.3f}.",
            "",
            "| method | accuracy [95% CI] | strongest attacker | its SSIM | its SRRA | "
            "stored-vs-clean cosine | pairs |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m in dict.fromkeys(r["method"] for r in rows if r["dataset"] == d):
            a, s = _acc(rows, d, m), strongest(rows, d, m)
            if a is None or s is None:
                continue
            lines.append(
                f"| {m} | {_ci(a, 'accuracy', 100, 2)} | {s['attacker']} | {s['ssim']:.3f} | "
                f"{100 * s['srra']:.1f}% | {a['stored_identity_cosine']:.3f} | {a['n_pairs']}"
                f"{' (full)' if a['full_protocol'] else ' (sample)'} |"
            )
        lines.append("")
    lines += [
        "## Training records",
        "",
        "| network | train set | n | epochs | seconds (budget) | "
        "identity overlap with test | L1 curve (per epoch) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for role, t in meta["training"].items():
        curve = ", ".join(f"{v:.4f}" for v in t["loss_curve"])
        lines.append(
            f"| {role} | {t['train_set']} | {t['n_train']} | {t['epochs']} | "
            f"{t['seconds']} ({t.get('budget_seconds', '—')}) | "
            f"{t['identity_overlap_with_test']} | {curve} |"
        )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """Per dataset and method: accuracy and the strongest attacker (the CLI's printout)."""
    out = ["dataset  method            accuracy  strongest attacker      SSIM   SRRA"]
    for d in dict.fromkeys(r["dataset"] for r in rows):
        for m in dict.fromkeys(r["method"] for r in rows if r["dataset"] == d):
            a, s = _acc(rows, d, m), strongest(rows, d, m)
            if s is None:
                continue
            acc = f"{100 * a['accuracy']:.2f}%" if a else "-"
            out.append(
                f"{d:8} {m:17} {acc:>8}  {s['attacker']:22} {s['ssim']:.3f} {100 * s['srra']:5.1f}%"
            )
    return "\n".join(out)


def write_all(out: Path, meta: dict, rows: list[dict]) -> None:
    from advface.pipelines.reproduce.report import _atomic_write

    write_json(out / "results.json", meta, rows)
    write_csvs(out, rows)
    _atomic_write(out / "report.md", render(meta, rows))
