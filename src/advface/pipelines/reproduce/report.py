"""Write a reproduction's outputs: results.json, one CSV per table, report.md beside the paper."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

from advface.pipelines.reproduce import paper
from advface.pipelines.reproduce.explain import MARKS, RECON_KEYS, Flag, explain
from advface.pipelines.reproduce.explain import find_row as _find
from advface.pipelines.reproduce.explain import fmt_value as _fmt

ROW_KEYS = (
    "table",
    "dataset",
    "method",
    "attacker",
    "shadow",
    "epsilon",
    "ssim",
    "psnr",
    "mse",
    "srra",
    "accuracy",
)
AGEDB = "agedb-30"
NO_COPY = "no offline copy"


def make_row(table: str, dataset: str, method: str, **values) -> dict:
    """A result row with every required key (None where not measured)."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(table=table, dataset=dataset, method=method)
    unknown = set(values) - set(ROW_KEYS) - {"extra"}
    if unknown:
        raise ValueError(f"unknown row keys {sorted(unknown)}")
    row.update({k: v for k, v in values.items() if k != "extra"})
    if values.get("extra"):
        row.update(values["extra"])
    return row


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    _atomic_write(path, json.dumps({**meta, "rows": rows}, indent=2, default=str) + "\n")


# What the report reads from results.json's profile without a default.
PROFILE_KEYS = ("name", "datasets", "archs", "epsilon", "alpha", "steps", "seed")


def load_results_json(path: Path) -> dict:
    """The parsed results.json (a reproduction's or a bench's); missing or not JSON: ValueError."""
    if not path.is_file():
        raise ValueError(f"no results file {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no results (not a JSON object)")
    return data


def read_results(path: Path, data: dict | None = None) -> tuple[dict, list[dict]]:
    """(meta, rows) of a reproduction's results.json (``data``: already parsed); a malformed
    file is a ValueError: every row a JSON object with a string ``table`` and ``dataset``, a
    profile with ``PROFILE_KEYS``."""
    data = load_results_json(path) if data is None else dict(data)
    if not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} holds no reproduction results (no 'rows' list)")
    profile = data.get("profile")
    if not isinstance(profile, dict):
        raise ValueError(f"{path} holds no reproduction results (no 'profile')")
    missing = [k for k in PROFILE_KEYS if k not in profile]
    if missing:
        raise ValueError(f"{path}: the profile lacks {', '.join(missing)}")
    for key in ("datasets", "archs"):
        if not isinstance(profile[key], list) or not all(isinstance(v, str) for v in profile[key]):
            raise ValueError(f"{path}: the profile's {key} is not a list of names")
    rows = data.pop("rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is not a JSON object")
        bad = [k for k in ("table", "dataset") if not isinstance(row.get(k), str)]
        if bad:
            raise ValueError(f"{path}: row {i} has no {' or '.join(bad)} name")
    return data, rows


def render_checked(path: Path, render: Callable[[dict, list[dict]], str], meta, rows) -> str:
    """``render(meta, rows)``; a value of the wrong shape (a row or record the renderer cannot
    read) is a ValueError naming ``path``, so that nothing is written."""
    try:
        return render(meta, rows)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{path}: results the report cannot read ({what})") from None


def render_results(path: Path, meta: dict, rows: list[dict]) -> str:
    """report.md's text for ``path``'s reproduction results (see :func:`render_checked`)."""
    return render_checked(path, render_markdown, meta, rows)


def write_csvs(out: Path, rows: list[dict]) -> list[Path]:
    paths = []
    for table in sorted({r["table"] for r in rows}):
        sel = [r for r in rows if r["table"] == table]
        keys = list(ROW_KEYS) + sorted({k for r in sel for k in r} - set(ROW_KEYS))
        path = out / f"{table}.csv"
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(sel)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _ci(row: dict, kind: str) -> str:
    """' [low-high]' of a rate's 95% interval when the row has one."""
    ci = row.get(f"{kind}_ci95") if kind in ("accuracy", "srra") else None
    return f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]" if ci else ""


def _mark(row: dict, ours: float, ref: float, kind: str, base: tuple | None) -> str | None:
    """The cell's mark (see ``MARKS``), or None when it agrees with the paper. ``base``: the
    unprotected row's (ours, paper's) value of ``kind``, to compare the changes."""
    tol = paper.TOLERANCE[kind]
    if abs(ours - ref) > tol:
        ci = row.get(f"{kind}_ci95")
        return "≈" if ci and ci[0] <= ref <= ci[1] else "⚑"
    if base and None not in base and abs((ours - base[0]) - (ref - base[1])) > tol:
        return "Δ"
    return None


def _cell(
    row: dict,
    ref: float | None,
    kind: str,
    flags: list[Flag],
    where: str,
    d: str,
    base: tuple | None = None,
) -> str:
    """'ours [95% interval] (paper)' with a mark when it differs from the paper."""
    ours = row.get(kind)
    text = f"{_fmt(ours, kind)}{_ci(row, kind)} ({_fmt(ref, kind)})"
    if ours is None or ref is None:
        return text
    mark = _mark(row, ours, ref, kind, base)
    if mark:
        flags.append(Flag(where, kind, ours, ref, row, d, mark))
        text += f" {mark}"
    return text


def _paper_cells(
    rows: list[dict],
    flags: list[Flag],
    datasets: list[str],
    keys: tuple[str, ...],
    ref: dict,
    label: str,
    base: tuple[dict, dict] | None = None,
    **match: object,
) -> list[str]:
    """One table row's cells: per dataset, ``keys`` of the matching row beside the paper's
    values (``ref[dataset]``: one value, or a tuple in ``keys`` order), then AgeDB's.
    ``base``: (match of the unprotected row, the paper's unprotected values like ``ref``)."""
    cells = []
    for d in datasets:
        r = _find(rows, dataset=d, **match) or {}
        theirs = _per_key(ref.get(d), keys)
        if base is None:
            bases = [None] * len(keys)
        else:
            b_row = _find(rows, dataset=d, **base[0]) or {}
            b_ref = _per_key(base[1].get(d), keys)
            bases = [(b_row.get(k), b_ref[i]) for i, k in enumerate(keys)]
        cells.append(
            " / ".join(
                _cell(r, theirs[i], k, flags, f"{label} {d}", d, bases[i])
                for i, k in enumerate(keys)
            )
        )
    return [*cells, NO_COPY]


def _per_key(values: object, keys: tuple[str, ...]) -> tuple:
    """The paper's values of a row, one per key (a scalar applies to every key)."""
    return values if isinstance(values, tuple) else (values,) * len(keys)


class _Doc:
    """The report being written: its lines, the deviation flags and the table layout."""

    def __init__(self, meta: dict, rows: list[dict]) -> None:
        self.meta, self.rows, self.prof = meta, rows, meta["profile"]
        self.datasets = list(self.prof["datasets"])
        self.flags: list[Flag] = []
        self.lines: list[str] = []
        self.cols = [*self.datasets, AGEDB]

    def table(self, title: str, first: list[str], intro: str = "") -> None:
        self.lines += ["", f"## {title}", ""] + ([intro, ""] if intro else [])
        self.lines += [
            "| " + " | ".join(first + self.cols) + " |",
            "|---" * (len(self.cols) + len(first)) + "|",
        ]

    def paper_row(self, label: list[str], keys, ref: dict, where: str, base=None, **match) -> None:
        cells = _paper_cells(self.rows, self.flags, self.datasets, keys, ref, where, base, **match)
        self.lines.append("| " + " | ".join(label + cells) + " |")

    def plain(self, title: str, head: list[str], rows: list[dict], cells) -> None:
        """A table of ``rows`` (no paper column); ``cells(row)`` gives a row's cells."""
        if not rows:
            return
        self.lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |"]
        self.lines.append("|---" * len(head) + "|")
        self.lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows]


def _header(doc: _Doc) -> None:
    meta, prof = doc.meta, doc.prof
    tol = ", ".join(f"{k} ±{v}" for k, v in paper.TOLERANCE.items())
    marks = "; ".join(f"{m} {text}" for m, text in MARKS.items())
    doc.lines += [
        f"# AdvFace reproduction — profile `{prof['name']}`",
        "",
        f"Device: {meta.get('device')}; machine: {meta.get('machine')}; "
        f"wall time {meta.get('wall_s', 0):.0f} s; advface {meta.get('advface_version')} "
        f"(code {meta.get('git_commit') or 'commit not recorded'}), "
        f"torch {meta.get('torch_version')}; FaceNet weights sha256 "
        f"{meta.get('facenet_weights_sha256')}.",
        "",
        "Each cell reads **ours (paper)**, rates (accuracy, SRRA) with our 95% interval: "
        f"**ours [interval] (paper)**. Tolerances: {tol}. Marks: {marks}. "
        f"AgeDB-30 columns: {NO_COPY}.",
        "",
    ]
    if meta.get("complete") is False:
        doc.lines += [
            f"> **Partial results**: done {', '.join(meta.get('parts_done', []))}; pending "
            f"{', '.join(meta.get('parts_pending', []))}. Rerun the same command to resume.",
            "",
        ]
    elif "complete" not in meta:
        doc.lines += ["> Completeness not recorded (results written by an older version).", ""]
    for note in prof.get("notes", ()):
        # Profile notes are clauses; the report prints them as sentences.
        end = "" if note.rstrip().endswith((".", "!", "?", ")")) else "."
        doc.lines += [f"> {note}{end}", ""]
    doc.lines += [f"- Deviation: {dev}" for dev in meta.get("deviations", ())]


def _pairs_note(meta: dict, rows: list[dict]) -> str:
    """How many pairs the accuracy rows use: the full protocol, or a stated sample."""
    prof = meta["profile"]
    n = {r["dataset"]: r.get("n_pairs") for r in rows if r["table"] == "table2"}
    sizes = ", ".join(f"{d} n_pairs = {v}" for d, v in n.items())
    if not n:
        return "No accuracy row measured yet."
    if prof.get("pairs_per_fold") is None:
        return f"Accuracy on the full protocols ({sizes}); 95% Wilson intervals over pairs."
    return (
        f"Accuracy on a seeded (seed {prof['seed']}) random sample of {prof['pairs_per_fold']} "
        f"pairs per fold, half genuine, over all 10 folds ({sizes}), not the full protocols; "
        "95% Wilson intervals over pairs."
    )


def _setup(doc: _Doc) -> None:
    """Protocols, training (identity overlap, loss), MTCNN fallbacks, protections."""
    meta = doc.meta
    unprot = meta.get("unprotected", {})
    doc.plain(
        "Unprotected system (operating thresholds for SRRA)",
        ["dataset", "pairs", "full protocol", "accuracy [95%]", "threshold", "FAR=1e-3 thr."],
        [{"dataset": d, **u} for d, u in unprot.items()],
        lambda u: [u["dataset"], u["n_pairs"], u.get("full_protocol"),
                   _fmt(u["accuracy"], "accuracy") + _ci(u, "accuracy"),
                   f"{u['threshold']:.3f}", f"{u['threshold_far_1e-3']:.3f}"],
    )  # fmt: skip
    doc.plain(
        "Trained networks (identity overlap with the test people, counted by name)",
        ["network", "arch", "features", "train set", "images", "people", "epochs",
         "wall s (budget clock s)", "last L1", "identity overlap"],
        [{"name": k, **v} for k, v in meta.get("training", {}).items()],
        lambda t: [t["name"], t["arch"], t.get("features", "clean"), t["train_set"],
                   t["n_train"], t["people"],
                   f"{t['epochs']}{' + partial' if t.get('partial_epoch') else ''}",
                   f"{t['seconds']} ({t.get('budget_seconds', '—')})",
                   (t["loss_curve"] or ["—"])[-1],
                   _overlap(t["identity_check"])],
    )  # fmt: skip
    if any("budget_seconds" in t for t in meta.get("training", {}).values()):
        doc.lines += ["", "The budget clock counts CPU time per thread, so that other work on the "
                      "cores does not shorten training; wall time exceeds it when the cores are "
                      "shared or a run is paused and resumed."]  # fmt: skip
    if "loss_curves.png" in meta.get("figures", []):
        doc.lines += ["", "![training loss](loss_curves.png)"]
    doc.plain(
        "MTCNN fallbacks (no face found: a fixed crop is used)",
        ["images of", "dataset", "images", "fallbacks"],
        [{"role": k, **v} for k, v in meta.get("fallbacks", {}).items()],
        lambda f: [f["role"], f["dataset"], f["images"], f["fallbacks"]],
    )
    doc.plain(
        "Protections (complete parameters, in every stage key)",
        ["setting", "parameters"],
        [{"label": k, "params": v} for k, v in meta.get("protections", {}).items()],
        lambda r: [r["label"], json.dumps(
            {k: v for k, v in r["params"].items() if not k.endswith("sha256")})],
    )  # fmt: skip


def _overlap(check: dict | None) -> str:
    if not check:
        return "—"
    if check.get("checked_by_name"):
        return str(check["overlap"])
    return "not comparable (anonymous CelebA ids)"


def _recon_cells(r: dict) -> list[str]:
    return [r["dataset"], r["attacker"], _fmt(r["ssim"], "ssim"), _fmt(r["psnr"], "psnr"),
            _fmt(r["mse"], "mse"), _fmt(r["srra"], "srra") + _ci(r, "srra"),
            _fmt(r.get("srra_far_1e-3"), "srra")]  # fmt: skip


def _paper_tables(doc: _Doc) -> None:
    """Tables 1-4 beside the paper; each protected cell's change from the unprotected row is
    compared with the paper's too."""
    recon_base = ({"table": "table1", "method": "none"}, paper.TABLE1["none"])
    acc_base = ({"table": "table2", "method": "none", "mode": "online"}, paper.TABLE2["none"])
    doc.table("Table 1 — reconstruction (ResRec attacker, ResRec shadow): SSIM / PSNR / MSE / "
              "SRRA", ["method"])  # fmt: skip
    for m in ("none", "random", "dp", "advface"):
        doc.paper_row([m], RECON_KEYS, paper.TABLE1[m], f"table1 {m}",
                      None if m == "none" else recon_base, table="table1", method=m)  # fmt: skip
    doc.lines += _floor_lines(doc.rows)
    doc.table("Table 2 — verification accuracy (stored side protected; online: Psi, offline: "
              "a Psi' for protected features)", ["method"])  # fmt: skip
    for m in ("none", "random", "dp", "advface"):
        doc.paper_row(
            [m], ("accuracy",), paper.TABLE2[m], f"table2 {m}",
            None if m == "none" else acc_base, table="table2", method=m, mode="online",
        )  # fmt: skip
    rows = doc.rows
    offline = [r for r in rows if r["table"] == "table2" and r.get("mode") not in (None, "online")]
    for m, mode, label in dict.fromkeys((r["method"], r["mode"], r["head"]) for r in offline):
        ref = (paper.TABLE2_OFFLINE if mode == "offline" else {}).get(m, {})
        doc.paper_row([f"{m} ({mode}, {label})"], ("accuracy",), ref, f"table2 {m} {mode}",
                      acc_base, table="table2", method=m, mode=mode, head=label)  # fmt: skip
    doc.lines.append("")
    if not offline and doc.meta.get("offline_heads"):
        doc.lines.append("Offline mode (Psi' on protected features): heads trained (below), "
                         "accuracy rows not measured yet.")  # fmt: skip
    elif not offline:
        doc.lines.append("Offline mode (Psi' on protected features): no head in this run.")
    doc.lines.append(_pairs_note(doc.meta, rows))
    _offline_heads(doc)
    doc.table("Table 3 — accuracy per shadow model", ["shadow"], _not_run_note(doc))
    for s in doc.prof["archs"]:
        doc.paper_row([s], ("accuracy",), paper.TABLE3.get(s, {}), f"table3 {s}", acc_base,
                      table="table3", shadow=s)  # fmt: skip
    doc.table("Table 4 — SSIM / PSNR per shadow x attacker", ["shadow", "attacker"],
              _not_run_note(doc))  # fmt: skip
    for s in doc.prof["archs"]:
        for a in doc.prof["archs"]:
            # The paper reports unprotected features for its ResRec attacker only.
            base = ({"table": "attackers", "attacker": a}, paper.TABLE1["none"] if a == "resrec"
                    else {})  # fmt: skip
            doc.paper_row([s, a], ("ssim", "psnr"), paper.TABLE4.get((s, a), {}),
                          f"table4 {s}->{a}", base, table="table4", shadow=s,
                          attacker=a)  # fmt: skip


def _floor_lines(rows: list[dict]) -> list[str]:
    """Per dataset, the floors the robustness bench measured: the mean face (no information)
    and the best attacker that sees only the clean embedding, by SSIM and by SRRA (what any
    system that stores embeddings concedes), each with its number of faces."""
    floors = [
        r for r in rows
        if r["table"] == "robustness" and str(r.get("method")).startswith("floor-")
        and r.get("ssim") is not None
    ]  # fmt: skip
    out = []
    for d in dict.fromkeys(r["dataset"] for r in floors):
        mine = [r for r in floors if r["dataset"] == d]
        parts = [
            f"mean face SSIM {_fmt(r['ssim'], 'ssim')} (n={r.get('n_images')})"
            for r in mine
            if r["method"] == "floor-mean-face"
        ]
        emb = [r for r in mine if r["method"] != "floor-mean-face"]
        if emb:
            s = max(emb, key=lambda r: r["ssim"])
            i = max(emb, key=lambda r: r.get("srra") or 0.0)
            parts.append(
                f"embedding only: SSIM {_fmt(s['ssim'], 'ssim')} ({s['method']}, "
                f"n={s.get('n_images')}), SRRA {_fmt(i.get('srra'), 'srra')} ({i['method']}, "
                f"n={i.get('n_images')})"
            )
        out.append(f"- {d}: " + "; ".join(parts))
    if not out:
        return []
    return [
        "",
        "Floors beside Table 1, measured by the robustness bench on its own test faces (so "
        "their n differs from the table's): the mean face, an output with no information, and "
        "the strongest attacker that sees only the clean embedding.",
        "",
        *out,
    ]


def _not_run_note(doc: _Doc) -> str:
    """Which datasets this profile leaves out of Tables 3/4 ("—" cells there were not run)."""
    left = [d for d in doc.datasets if d not in doc.prof.get("transfer_datasets", doc.datasets)]
    if not left:
        return ""
    return f"Not run on {', '.join(left)} in this profile (its cells read — beside the paper)."


def _offline_heads(doc: _Doc) -> None:
    """How each offline row's head was made: distilled here (its stage) or given."""
    doc.plain(
        "Offline heads (Psi' of Table 2's offline rows; distillation loss 1 - cos to Psi(z))",
        ["head", "method", "source", "model_version", "images", "epochs", "stopped by",
         "loss protected before -> after", "same protection as the online row"],
        [{"label": k, **v} for k, v in doc.meta.get("offline_heads", {}).items()],
        lambda h: [h["label"], h.get("method"), h["source"], h["model_version"], h["images"],
                   h["epochs"], h["stopped_by"], _loss(h), h.get("protection_matches_run",
                                                             True)],
    )  # fmt: skip


def _loss(h: dict) -> str:
    before, after = h.get("loss_before") or {}, h.get("loss_after") or {}
    if "protected" not in before or "protected" not in after:
        return "—"
    return f"{before['protected']:.4f} -> {after['protected']:.4f}"


def _robustness(doc: _Doc) -> None:
    """The robustness bench run inside this reproduction: a pointer to its own report."""
    bench = doc.meta.get("robustness")
    if not bench:
        return
    rows = [r for r in doc.rows if r["table"] == "robustness"]
    methods = ", ".join(dict.fromkeys(r["method"] for r in rows))
    state = "complete" if bench.get("complete") else "incomplete: rerun to resume"
    doc.lines += [
        "",
        "## Robustness bench",
        "",
        f"Bench profile `{bench['profile']}` ({state}), run into `{bench['folder']}/`: "
        f'{len(rows)} rows with `table: "robustness"` in results.json and robustness.csv '
        f"({methods}; every attacker including adaptive ones, beside the floors). "
        f"Full report: [{bench['report']}]({bench['report']}).",
    ]


def _extra_tables(doc: _Doc) -> None:
    """The sweep, both readings, the adaptive attacker."""
    rows, prof = doc.rows, doc.prof
    sweep = sorted((r for r in rows if r["table"] == "fig4"),
                   key=lambda r: (r["dataset"], r["epsilon"]))  # fmt: skip
    doc.plain(
        "Fig. 3/4 — noise-bound sweep (ResRec shadow and attacker)",
        ["dataset", "epsilon", "PSNR", "SSIM", "accuracy [95%]", "n_pairs"],
        sweep,
        lambda r: [r["dataset"], f"{r['epsilon']:.2f}", _fmt(r["psnr"], "psnr"),
                   _fmt(r["ssim"], "ssim"), _fmt(r["accuracy"], "accuracy") + _ci(r, "accuracy"),
                   r.get("n_pairs")],
    )  # fmt: skip
    if sweep:
        doc.lines += ["", "![PSNR vs accuracy](fig4_psnr_accuracy.png)"]
    doc.plain(
        f"Readings (epsilon {prof['epsilon']}, alpha {prof['alpha']}, T={prof['steps']}): "
        "AdvFace per-step (each step bounded, drift up to T x alpha) vs projected (PGD onto the "
        "epsilon ball); random noise accumulated (the paper's text) vs projected (AdvFace's "
        "budget)",
        ["dataset", "method", "reading", "SSIM", "PSNR", "SRRA", "accuracy [95%]"],
        [r for r in rows if r["table"] == "readings"],
        lambda r: [r["dataset"], r["method"], r["reading"], _fmt(r["ssim"], "ssim"),
                   _fmt(r["psnr"], "psnr"), _fmt(r["srra"], "srra"),
                   _fmt(r["accuracy"], "accuracy") + _ci(r, "accuracy")],
    )  # fmt: skip
    doc.plain(
        "Adaptive attacker vs the paper's attacker (AdvFace features)",
        ["dataset", "attacker", "SSIM", "PSNR", "MSE", "SRRA [95%]", "SRRA @ FAR=1e-3"],
        [r for r in rows if r["table"] == "adaptive"],
        _recon_cells,
    )


def render_markdown(meta: dict, rows: list[dict]) -> str:
    doc = _Doc(meta, rows)
    _header(doc)
    _setup(doc)
    doc.plain(
        "Attackers on unprotected features",
        ["dataset", "attacker", "SSIM", "PSNR", "MSE", "SRRA [95%]", "SRRA @ FAR=1e-3"],
        [r for r in rows if r["table"] == "attackers"],
        _recon_cells,
    )
    _paper_tables(doc)
    _extra_tables(doc)
    _robustness(doc)
    _compute_time(doc)
    figs = [f for f in meta.get("figures", []) if f != "loss_curves.png"]
    if figs:
        doc.lines += ["", "## Figures", ""] + [f"- [{f}]({f})" for f in figs]
        if meta.get("grid_encoding") == "jpeg-95":
            doc.lines += [
                "",
                "Reconstructions are shown as kept in each setting's record (JPEG at quality "
                "95, for display); every metric above was computed on them before encoding.",
            ]
    doc.lines += ["", "## Differences from the paper", ""]
    doc.lines += [
        f"- {f.mark} {f.where} {f.kind}: {_fmt(f.ours, f.kind)} vs paper {_fmt(f.ref, f.kind)}. "
        f"Why: {explain(f, rows, meta)}"
        for f in doc.flags
    ] or ["- none" + (" among the cells measured so far" if meta.get("complete") is False else "")]
    return "\n".join(doc.lines) + "\n"


def _compute_time(doc: _Doc) -> None:
    """What each cached stage cost to compute, across resumes (wall seconds on this machine,
    longer when it was shared); the decoders' and heads' times are in their own tables."""
    spent = doc.meta.get("stage_compute_seconds") or {}
    known = [v for v in spent.values() if v is not None]
    rows = [{"stage": k, "seconds": v} for k, v in sorted(spent.items())]
    if known:
        total = f"{sum(known) / 3600:.2f} h" + (
            " (some stages unrecorded)" if None in spent.values() else ""
        )
        rows.append({"stage": "**total**", "seconds": total})
    doc.plain(
        "Compute time of the cached stages (wall seconds, summed over chunks and resumes)",
        ["stage", "seconds"],
        rows,
        lambda r: [r["stage"], "unrecorded" if r["seconds"] is None else r["seconds"]],
    )


def write_report(out: Path, meta: dict, rows: list[dict], text: str | None = None) -> Path:
    """Write ``out/report.md`` (``text``: already rendered, else rendered here)."""
    path = out / "report.md"
    _atomic_write(path, render_markdown(meta, rows) if text is None else text)
    return path
