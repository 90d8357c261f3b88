"""The headline table printed at the end of a reproduction."""

from __future__ import annotations


def _pct(v: float | None) -> str:
    return "    —" if v is None else f"{100 * v:6.2f}%"


def _acc(row: dict | None) -> str:
    """Accuracy with its 95% interval (the sample's width matters for reading it)."""
    if not row or row.get("accuracy") is None:
        return "    —"
    ci = row.get("accuracy_ci95")
    return _pct(row["accuracy"]) + (f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]" if ci else "")


def headline_table(rows: list[dict]) -> str:
    """Table 1 + Table 2 in one block: per dataset and method, SSIM, PSNR, SRRA, accuracy
    [95% interval]; then the pairs each dataset's accuracy rests on."""
    acc = {
        (r["dataset"], r["method"]): r
        for r in rows
        if r["table"] == "table2" and r.get("mode", "online") == "online"
    }
    lines = [f"{'dataset':8} {'method':8} {'SSIM':>6} {'PSNR':>6} {'SRRA':>8}  accuracy [95%]"]
    for r in rows:
        if r["table"] != "table1":
            continue
        lines.append(
            f"{r['dataset']:8} {r['method']:8} {r['ssim']:6.3f} {r['psnr']:6.2f} "
            f"{_pct(r['srra']):>8}  {_acc(acc.get((r['dataset'], r['method'])))}"
        )
    pairs = {d: r.get("n_pairs") for (d, m), r in acc.items() if m == "none"}
    full = {d: r.get("full_protocol") for (d, m), r in acc.items() if m == "none"}
    if pairs:
        lines.append(
            "accuracy on "
            + ", ".join(
                f"{d}: {n} pairs ({'full protocol' if full[d] else 'seeded stratified sample'})"
                for d, n in pairs.items()
            )
        )
    return "\n".join(lines)
