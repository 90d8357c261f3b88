"""One function per table or figure of the paper's Sec. 5: each measures what it needs
(:func:`~advface.pipelines.reproduce.evaluate.measure`, cached) and returns its rows; the
reconstructions it shows go into ``ev.grids`` for the figures."""

from __future__ import annotations

from advface.pipelines.reproduce.evaluate import (
    OTHER_READING,
    DatasetEval,
    ProtectionConfig,
    main_config,
    measure,
    merge,
)
from advface.pipelines.reproduce.networks import Context, Networks
from advface.pipelines.reproduce.report import make_row

METHODS: tuple[str, ...] = ("none", "random", "dp", "advface")


def _advface_cols(ctx: Context, method: str) -> dict:
    adv = method == "advface"
    return {"shadow": "resrec" if adv else None, "epsilon": ctx.profile.epsilon if adv else None}


def attackers_table(ctx: Context, ev: DatasetEval, nets: Networks) -> list[dict]:
    """Every attacker on unprotected features (the attack benchmark)."""
    m = measure(ctx, ev, nets, ProtectionConfig("none"))
    return [
        make_row("attackers", ev.dataset, "none", attacker=a, **m.recon_values(a))
        for a in nets.attackers
    ]


def table1(ctx: Context, ev: DatasetEval, nets: Networks) -> list[dict]:
    """Reconstruction by the ResRec attacker under each method (and Fig. 5's grids)."""
    rows = []
    for m in METHODS:
        rec = measure(ctx, ev, nets, main_config(ctx, m))
        vals = rec.recon_values("resrec")
        rows.append(
            make_row("table1", ev.dataset, m, attacker="resrec", **_advface_cols(ctx, m), **vals)
        )
        ev.grids[m] = rec.grids["resrec"]
    return rows


def table2(ctx: Context, ev: DatasetEval, nets: Networks) -> list[dict]:
    """Verification accuracy, online mode (stored side protected, probe clean), and one more
    row per extra head of ``ev.heads`` with ``mode``/``head`` columns: its method's stored
    features through that head (e.g. the offline mode's Psi')."""
    rows = []
    for m in METHODS:
        vals = measure(ctx, ev, nets, main_config(ctx, m)).accuracy_values()
        vals["extra"]["mode"] = "online"
        if m == "none":
            vals["extra"]["accuracy_full_protocol"] = ev.unprotected["accuracy"]
        rows.append(make_row("table2", ev.dataset, m, **_advface_cols(ctx, m), **vals))
    for label, head in ev.heads.items():
        vals = measure(ctx, ev, nets, main_config(ctx, head.method)).accuracy_values(label)
        vals["extra"].update(mode=head.mode, head=label, head_version=head.version)
        rows.append(
            make_row("table2", ev.dataset, head.method, **_advface_cols(ctx, head.method), **vals)
        )
    return rows


def _transfer(ctx: Context, ev: DatasetEval) -> tuple[str, ...]:
    p = ctx.profile
    return p.archs if ev.dataset in p.transfer_datasets else ()


def table3(ctx: Context, ev: DatasetEval, nets: Networks) -> list[dict]:
    """AdvFace's accuracy with each shadow architecture."""
    eps, rows = ctx.profile.epsilon, []
    for s in _transfer(ctx, ev):
        vals = measure(ctx, ev, nets, ProtectionConfig("advface", s, eps)).accuracy_values()
        rows.append(make_row("table3", ev.dataset, "advface", shadow=s, epsilon=eps, **vals))
    return rows


def table4(ctx: Context, ev: DatasetEval, nets: Networks) -> list[dict]:
    """Every attacker against AdvFace with every shadow (and Fig. 6's grids)."""
    eps, rows = ctx.profile.epsilon, []
    for s in _transfer(ctx, ev):
        rec = measure(ctx, ev, nets, ProtectionConfig("advface", s, eps))
        for a in ctx.profile.archs:
            vals = rec.recon_values(a)
            rows.append(
                make_row("table4", ev.dataset, "advface", attacker=a, shadow=s, epsilon=eps, **vals)
            )
            ev.grids[f"{s}->{a}"] = rec.grids[a]
    return rows


def fig4(ctx: Context, ev: DatasetEval, nets: Networks) -> list[dict]:
    """The noise-bound sweep: reconstruction and accuracy per epsilon (and Fig. 3's grids)."""
    p, rows = ctx.profile, []
    if ev.dataset not in p.sweep_datasets:
        return rows
    for e in sorted(set(p.sweep) | {p.epsilon}):
        rec = measure(ctx, ev, nets, ProtectionConfig("advface", "resrec", e))
        vals = merge(rec.recon_values("resrec"), rec.accuracy_values())
        rows.append(
            make_row(
                "fig4", ev.dataset, "advface", attacker="resrec", shadow="resrec", epsilon=e, **vals
            )
        )
        ev.grids[f"eps={e:.2f}"] = rec.grids["resrec"]
    return rows


def readings(ctx: Context, ev: DatasetEval, nets: Networks) -> list[dict]:
    """Both readings of eq. 6 for AdvFace, and both for the random baseline (accumulated, as
    the paper's text; projected onto AdvFace's epsilon ball, the like-for-like budget)."""
    p, rows = ctx.profile, []
    cfgs = [
        (p.reading, main_config(ctx, "advface")),
        (OTHER_READING[p.reading], ProtectionConfig("advface", "resrec", p.epsilon,
                                                    OTHER_READING[p.reading])),
        ("projected", ProtectionConfig("random")),
        ("accumulated", ProtectionConfig("random", reading="accumulated")),
    ]  # fmt: skip
    for reading, cfg in cfgs:
        rec = measure(ctx, ev, nets, cfg)
        vals = merge(rec.recon_values("resrec"), rec.accuracy_values())
        vals["extra"]["reading"] = reading
        rows.append(
            make_row("readings", ev.dataset, cfg.method, attacker="resrec",
                     **_advface_cols(ctx, cfg.method), **vals)
        )  # fmt: skip
    return rows


def adaptive(ctx: Context, ev: DatasetEval, nets: Networks) -> list[dict]:
    """The paper's attacker and the adaptive attacker (trained on AdvFace features made with
    its own shadow) on the server's AdvFace features."""
    rec = measure(ctx, ev, nets, main_config(ctx, "advface"))
    ev.grids["adaptive"] = rec.grids["adaptive-resrec"]
    return [
        make_row("adaptive", ev.dataset, "advface", attacker=a, **_advface_cols(ctx, "advface"),
                 **rec.recon_values(a))
        for a in ("resrec", "adaptive-resrec")
    ]  # fmt: skip
