"""The headline table printed at the end of a reproduction."""

from __future__ import annotations


def _pct(v: float | None) -> str:
    return "    —" if v is None else f"{100 * v:6.2f}%"


def headline_table(rows: list[dict]) -> str:
    """Table 1 + Table 2 in one block: per dataset and method, SSIM, PSNR, SRRA, accuracy."""
    acc = {
        (r["dataset"], r["method"]): r["accuracy"]
        for r in rows
        if r["table"] == "table2" and r.get("mode", "online") == "online"
    }
    lines = [f"{'dataset':8} {'method':8} {'SSIM':>6} {'PSNR':>6} {'SRRA':>8} {'accuracy':>9}"]
    for r in rows:
        if r["table"] != "table1":
            continue
        lines.append(
            f"{r['dataset']:8} {r['method']:8} {r['ssim']:6.3f} {r['psnr']:6.2f} "
            f"{_pct(r['srra']):>8} {_pct(acc.get((r['dataset'], r['method']))):>9}"
        )
    return "\n".join(lines)
