"""PNG figures of a reproduction: the PSNR/accuracy trade-off (Fig. 4) and reconstruction
grids (Fig. 3, 5, 6 and the adaptive attacker)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(columns: dict[str, np.ndarray], path: Path, title: str) -> None:
    """One column per label, one row per face; images uint8 (N,H,W,3)."""
    labels = [k for k, v in columns.items() if v is not None and len(v)]
    n = min(len(columns[k]) for k in labels)
    fig, axes = plt.subplots(
        n, len(labels), figsize=(1.4 * len(labels), 1.4 * n + 0.5), squeeze=False
    )
    for j, k in enumerate(labels):
        for i in range(n):
            ax = axes[i][j]
            ax.imshow(columns[k][i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(k, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def psnr_accuracy_plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for d in sorted({r["dataset"] for r in rows}):
        sel = sorted((r for r in rows if r["dataset"] == d), key=lambda r: r["epsilon"])
        psnr = [r["psnr"] for r in sel]
        acc = [100 * r["accuracy"] for r in sel]
        ax.plot(psnr, acc, marker="o", label=d)
        for r, x, y in zip(sel, psnr, acc, strict=True):
            ax.annotate(
                f"{r['epsilon']:.2f}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.set_xlabel("PSNR of ResRec reconstruction (dB)")
    ax.set_ylabel("verification accuracy (%)")
    ax.set_title("AdvFace noise bound: privacy vs accuracy", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curves_plot(training: dict[str, dict], path: Path) -> None:
    """Training L1 per epoch of every decoder (a last partial epoch, cut by the time budget,
    is drawn as an open marker)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, rec in sorted(training.items()):
        curve = rec.get("loss_curve") or []
        if not curve:
            continue
        x = np.arange(1, len(curve) + 1)
        (line,) = ax.plot(x, curve, marker="o", ms=3, label=name)
        if rec.get("partial_epoch"):
            ax.plot(x[-1], curve[-1], "o", mfc="white", color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("training L1")
    ax.set_title("decoder training loss", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(
    out: Path,
    rows: list[dict],
    grids: dict[str, dict[str, np.ndarray]],
    profile,
    training: dict[str, dict] | None = None,
) -> list[str]:
    """Write every figure into ``out``; return the file names."""
    files: list[str] = []
    if training:
        loss_curves_plot(training, out / "loss_curves.png")
        files.append("loss_curves.png")
    sweep = [r for r in rows if r["table"] == "fig4"]
    if sweep:
        psnr_accuracy_plot(sweep, out / "fig4_psnr_accuracy.png")
        files.append("fig4_psnr_accuracy.png")
    for d, g in grids.items():
        orig = g["original"]
        specs = {
            "fig5_methods": (
                {"original": orig, **{m: g.get(m) for m in ("none", "random", "dp", "advface")}},
                f"{d}: ResRec attacker on features stored by each method",
            ),
            "fig6_transfer": (
                {"original": orig, **{k: v for k, v in g.items() if "->" in k}},
                f"{d}: AdvFace shadow -> attacker",
            ),
            "fig3_sweep": (
                {"original": orig, **{k: v for k, v in g.items() if k.startswith("eps=")}},
                f"{d}: AdvFace noise bound (ResRec shadow and attacker)",
            ),
            "adaptive": (
                {
                    "original": orig,
                    "paper attacker": g.get("advface"),
                    "adaptive attacker": g.get("adaptive"),
                },
                f"{d}: attackers on AdvFace features",
            ),
        }
        for name, (cols, title) in specs.items():
            if sum(1 for v in cols.values() if v is not None and len(v)) < 2:
                continue
            fname = f"{name}_{d}.png"
            image_grid(cols, out / fname, title)
            files.append(fname)
    return files
