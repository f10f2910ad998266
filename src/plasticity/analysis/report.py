"""The run report, from the Parquet tables alone: statistics, plots and a Markdown page.

`build_report(storage, run_id, cfg)` reads `plasticity`, `plasticity_items`,
`directions` and `direction_similarity`, writes the `plasticity_stats` table, the PNG
figures and `summary.md` under `runs/<run_id>/report/`, and returns what it made.
"""

from __future__ import annotations

import io
import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np

from plasticity.analysis.stats import compare_stages
from plasticity.config import RunConfig
from plasticity.storage.fs import Storage
from plasticity.storage.shards import Rows, read_table, write_shard

log = logging.getLogger(__name__)


@dataclass
class Report:
    markdown: str
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG
    figure_uris: dict[str, str] = field(default_factory=dict)
    figure_paths: dict[str, str] = field(default_factory=dict)  # storage paths
    shards: list[str] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)  # slopes of the headline metric
    critical_windows: list[int] = field(default_factory=list)


# -- statistics -------------------------------------------------------------------------


def _group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def item_slope_table(items) -> dict[tuple, np.ndarray]:
    """Per-item slopes keyed (source, target, concept, direction, null_seed, layers, operator,
    metric), items in order."""
    cols = ["source_step", "target_step", "concept", "direction", "null_seed", "layers",
            "operator", "metric", "item", "item_slope"]
    rows = items.select(cols).to_pylist()
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        out.setdefault(tuple(r[c] for c in cols[:8]), {})[r["item"]] = r["item_slope"]
    return {k: np.array([v[i] for i in sorted(v)]) for k, v in out.items()}


def plasticity_stats(items, level: float = 0.05) -> dict[str, list]:
    """`plasticity_stats` rows: per (concept, layers, operator, metric), the comparison of
    the diagonal (self-plasticity, scope 'self') across stages, and for each target j the
    comparison of every source's direction on it (scope 'target=j')."""
    slopes = item_slope_table(items)
    real = {k: v for k, v in slopes.items() if k[3] != "random"}
    out = Rows("plasticity_stats")
    by_cell = _group(
        [dict(key=k, source=k[0], target=k[1], group=(k[2], k[5], k[6], k[7])) for k in real],
        ("group",),
    )
    for (group,), cells in sorted(by_cell.items()):
        concept, layers, operator, metric = group
        comparisons: list[tuple[str, list[int], list[np.ndarray]]] = []
        diag = sorted((c for c in cells if c["source"] == c["target"]), key=lambda c: c["source"])
        if len(diag) >= 2:
            comparisons.append(("self", [c["source"] for c in diag], [real[c["key"]] for c in diag]))
        for target in sorted({c["target"] for c in cells}):
            col = sorted((c for c in cells if c["target"] == target), key=lambda c: c["source"])
            if len(col) >= 2:
                comparisons.append(
                    (f"target={target}", [c["source"] for c in col], [real[c["key"]] for c in col])
                )
        for scope, stages, values in comparisons:
            for row in compare_stages(stages, values, level):
                out.add(scope=scope, concept=concept, layers=layers, operator=operator,
                        metric=metric, **row)
    return out.columns


# -- figures ----------------------------------------------------------------------------


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cells(plas: list[dict]) -> dict[tuple[int, int], dict]:
    """One summary per (source, target) of the headline selection: slope and its CI."""
    out = {}
    for r in plas:
        out[(r["source_step"], r["target_step"])] = r
    return out


def beats_null(cell: dict, null_max: float) -> bool:
    """A cell's slope CI excludes 0 and its slope is larger than every null slope."""
    return (cell["slope_ci_low"] > 0 or cell["slope_ci_high"] < 0) and abs(cell["slope"]) > null_max


def figure_matrix(cells, sources, targets, null_max, metric, concept) -> bytes:
    plt = _pyplot()
    m = np.full((len(sources), len(targets)), np.nan)
    for i, s in enumerate(sources):
        for j, t in enumerate(targets):
            if (s, t) in cells:
                m[i, j] = cells[(s, t)]["slope"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 + 1.1 * len(targets)), max(3.8, 1.4 + 0.9 * len(sources))))
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(targets)), [str(t) for t in targets])
    ax.set_yticks(range(len(sources)), [str(s) for s in sources])
    ax.set_xlabel("target checkpoint step (model steered)")
    ax.set_ylabel("source checkpoint step (direction)")
    ax.set_title(f"{concept}: slope of d({metric}) per unit alpha_rel\n* CI excludes 0 and |slope| > every null", fontsize=9)
    for i, s in enumerate(sources):
        for j, t in enumerate(targets):
            c = cells.get((s, t))
            if c is None:
                continue
            beats = beats_null(c, null_max.get(t, 0.0))
            ax.text(j, i, f"{c['slope']:.2g}{'*' if beats else ''}\n[{c['slope_ci_low']:.2g}, {c['slope_ci_high']:.2g}]",
                    ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def figure_self(cells, stages, null_slopes, windows, metric) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    xs = [s for s in stages if (s, s) in cells]
    y = np.array([cells[(s, s)]["slope"] for s in xs])
    lo = np.array([cells[(s, s)]["slope_ci_low"] for s in xs])
    hi = np.array([cells[(s, s)]["slope_ci_high"] for s in xs])
    ax.errorbar(xs, y, yerr=[y - lo, hi - y], marker="o", capsize=4, label="own direction (95% CI)")
    for k, (t, vals) in enumerate(sorted(null_slopes.items())):
        ax.scatter([t] * len(vals), vals, color="grey", marker="x", s=20, label="random directions" if k == 0 else None)
    for w in windows:
        ax.axvspan(w - 0.3, w + 0.3, color="orange", alpha=0.3, label="critical window" if w == windows[0] else None)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(f"slope of {metric} per alpha_rel")
    ax.set_title("Self-plasticity: each checkpoint steered by its own direction", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def figure_alpha(plas_rows: list[dict], targets, metric) -> bytes:
    plt = _pyplot()
    n = len(targets)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, t in zip(axes.flat, targets, strict=False):
        sel = [r for r in plas_rows if r["target_step"] == t]
        for key, grp in sorted(_group(sel, ("source_step", "direction", "null_seed")).items(),
                               key=lambda kv: (kv[0][0], kv[0][2] or 0)):
            grp = sorted(grp, key=lambda r: r["alpha_rel"])
            x = [r["alpha_rel"] for r in grp]
            yv = [r["delta"] for r in grp]
            if key[1] == "random":
                ax.plot(x, yv, color="grey", lw=0.8, ls="--")
            else:
                line, = ax.plot(x, yv, marker="o", ms=3, label=f"source {key[0]}")
                ax.fill_between(x, [r["ci_low"] for r in grp], [r["ci_high"] for r in grp],
                                color=line.get_color(), alpha=0.15)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"target {t}", fontsize=9)
        ax.set_xlabel("alpha_rel")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"change in {metric}")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Effect against alpha (dashed grey: random directions)", fontsize=9)
    return _png(fig)


def figure_detection(directions: list[dict]) -> bytes:
    plt = _pyplot()
    methods = sorted({r["method"] for r in directions})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods, strict=True):
        sel = [r for r in directions if r["method"] == method]
        for step, grp in sorted(_group(sel, ("checkpoint_step",)).items()):
            grp = sorted(grp, key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in grp], [r["detection_accuracy"] for r in grp], marker="o", ms=3,
                    label=f"step {step[0]}")
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("layer")
    axes[0, 0].set_ylabel("test detection accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Detection accuracy of the direction by layer, per checkpoint", fontsize=9)
    return _png(fig)


def figure_similarity(sim: list[dict], layer: int) -> bytes:
    plt = _pyplot()
    sel = [r for r in sim if r["layer"] == layer]
    steps = sorted({r["step_a"] for r in sel})
    m = np.full((len(steps), len(steps)), np.nan)
    for r in sel:
        m[steps.index(r["step_a"]), steps.index(r["step_b"])] = r["cosine"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.8 * len(steps)), max(3.4, 1.2 + 0.7 * len(steps))))
    im = ax.imshow(m, cmap="viridis", vmin=min(0.0, float(np.nanmin(m))), vmax=1.0)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_yticks(range(len(steps)), [str(s) for s in steps])
    for i in range(len(steps)):
        for j in range(len(steps)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title(f"Cosine between checkpoints' directions, layer {layer}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


# -- the report -------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:+.3g}"


def _optional(read, name: str) -> list[dict] | None:
    try:
        rows = read(name)
    except FileNotFoundError:
        return None
    rows = rows.to_pylist() if hasattr(rows, "to_pylist") else rows
    return rows or None


def intervention_stats(items: list[dict], level: float = 0.05) -> list[dict]:
    """`plasticity_stats` rows (scope 'training') comparing the intervention steps on the
    per-item change of each metric against the run's final model."""
    out = []
    for (concept, layer, metric), grp in sorted(_group(items, ("concept", "layer", "metric")).items()):
        by_step: dict[int, dict[int, float]] = {}
        for r in grp:
            by_step.setdefault(r["intervention_step"], {})[r["item"]] = r["delta"]
        if len(by_step) < 2:
            continue
        steps = sorted(by_step)
        values = [np.array([by_step[s][i] for i in sorted(by_step[s])]) for s in steps]
        for row in compare_stages(steps, values, level):
            out.append(dict(scope="training", concept=concept, layers=str(layer), operator="add",
                            metric=metric, **row))
    return out


def figure_intervention(summary: list[dict], metric: str) -> bytes:
    plt = _pyplot()
    sel = sorted((r for r in summary if r["metric"] == metric), key=lambda r: r["intervention_step"])
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    x = [r["intervention_step"] for r in sel]
    y = np.array([r["delta"] for r in sel])
    ax.errorbar(x, y, yerr=[y - np.array([r["ci_low"] for r in sel]), np.array([r["ci_high"] for r in sel]) - y],
                marker="o", capsize=4)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("intervention step (branch point)")
    ax.set_ylabel(f"change in {metric} at the end")
    lam = sel[0]["lam"] if sel else float("nan")
    ax.set_title(f"Training-time intervention (lambda={lam:g}) against the run's final model", fontsize=9)
    return _png(fig)


def build_report(storage: Storage, run_id: str, cfg: RunConfig, shards: dict[str, list[str]] | None = None) -> Report:
    """Statistics table, figures and summary of one run, from its tables alone.

    `shards` optionally restricts each table to the given (committed) shard paths.
    """
    shards = shards or {}

    def table(name: str):
        return read_table(storage, name, run_ids=[run_id], paths=shards.get(name) or None)

    p = cfg.plasticity
    metric = p.metrics[0]
    plas_all = _optional(table, "plasticity")
    inter = _optional(table, "intervention")
    inter_items = _optional(table, "intervention_items")
    if plas_all is None and inter is None:
        raise FileNotFoundError(f"run {run_id}: neither a plasticity nor an intervention table to report on")
    rep = Report(markdown="")
    figs: dict[str, bytes] = {}
    stats_rows: list[dict] = []
    matrix_md: list[str] = []
    layers0, operator0, steered_layer = None, p.operators[0], None
    head_stats: list[dict] = []
    if plas_all is not None:
        # The headline selection: the first metric, the first layer set and operator.
        layers0 = _first_set(cfg, plas_all)
        steered_layer = int(layers0.split(",")[0])
        head = [r for r in plas_all if r["metric"] == metric and r["layers"] == layers0 and r["operator"] == operator0]
        real = [r for r in head if r["direction"] != "random"]
        nulls = [r for r in head if r["direction"] == "random"]
        cells = _cells(real)
        sources = sorted({r["source_step"] for r in real})
        targets = sorted({r["target_step"] for r in real})
        null_slopes: dict[int, list[float]] = {}
        for r in _group(nulls, ("target_step", "null_seed")).values():
            null_slopes.setdefault(r[0]["target_step"], []).append(r[0]["slope"])
        null_max = {t: max(abs(v) for v in vals) for t, vals in null_slopes.items()}
        cols = plasticity_stats(table("plasticity_items"))
        stats_rows += [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]
        head_stats = [s for s in stats_rows if s["metric"] == metric and s["layers"] == layers0 and s["operator"] == operator0]
        windows = sorted(s["stage_a"] for s in head_stats if s["scope"] == "self" and s["test"] == "window" and s["critical_window"])
        figs["plasticity_matrix"] = figure_matrix(cells, sources, targets, null_max, metric, cfg.concept.name)
        figs["self_plasticity"] = figure_self(cells, targets, null_slopes, windows, metric)
        figs["effect_vs_alpha"] = figure_alpha(head, targets, metric)
        rep.sources, rep.targets, rep.critical_windows = sources, targets, windows
        rep.matrix = [[cells[(s, t)]["slope"] if (s, t) in cells else float("nan") for t in targets] for s in sources]
        matrix_md = _matrix_markdown(cfg, metric, layers0, operator0, cells, sources, targets, null_slopes,
                                     null_max, head_stats, windows)
    directions = table("directions").select(["checkpoint_step", "layer", "method", "detection_accuracy"]).to_pylist()
    sim = _optional(table, "direction_similarity") or []
    figs["detection_by_layer"] = figure_detection(directions)
    if steered_layer is None and sim:
        steered_layer = max(r["layer"] for r in sim)
    if any(r["layer"] == steered_layer for r in sim):
        figs["direction_similarity"] = figure_similarity(sim, steered_layer)
    training_md: list[str] = []
    if inter is not None:
        t_stats = intervention_stats(inter_items or [])
        stats_rows += t_stats
        figs["intervention"] = figure_intervention(inter, metric)
        training_md = _training_markdown(inter, t_stats, metric)

    out_dir = storage.path("runs", run_id, "report")
    stats_out = Rows("plasticity_stats")
    for r in stats_rows:
        stats_out.add(**r)
    rep.shards.append(write_shard(storage, "plasticity_stats", {"run_id": run_id}, cfg.concept.name, stats_out.columns))
    for name, png in figs.items():
        path = posixpath.join(out_dir, f"{name}.png")
        storage.write_bytes(path, png)
        rep.figure_uris[name] = storage.full_uri(path)
        rep.figure_paths[name] = path
    rep.figures = figs

    if plas_all is not None:
        # CSV of every metric's matrix, for spreadsheets.
        csv = ["metric,layers,operator,source_step,target_step,slope,slope_ci_low,slope_ci_high"]
        for r in sorted(_group([r for r in plas_all if r["direction"] != "random"],
                               ("metric", "layers", "operator", "source_step", "target_step")).items()):
            x = r[1][0]
            csv.append(f"{x['metric']},\"{x['layers']}\",{x['operator']},{x['source_step']},{x['target_step']},"
                       f"{x['slope']:.6g},{x['slope_ci_low']:.6g},{x['slope_ci_high']:.6g}")
        storage.write_bytes(posixpath.join(out_dir, "plasticity_matrix.csv"), ("\n".join(csv) + "\n").encode())

    lines = [f"# Run `{run_id}`: {cfg.concept.name} plasticity", ""]
    lines += matrix_md + training_md
    lines += _directions_markdown(cfg, directions, sim, steered_layer)
    lines += _vocab_markdown(storage, run_id, (p.method, steered_layer) if steered_layer is not None else None)
    lines += ["", "## Figures", ""] + [f"- `{name}.png`" for name in figs]
    rep.markdown = "\n".join(lines) + "\n"
    storage.write_bytes(posixpath.join(out_dir, "summary.md"), rep.markdown.encode())
    return rep


def _first_set(cfg: RunConfig, plas_all: list[dict]) -> str:
    """The `layers` label of the first configured layer set (the middle layer when none
    is configured: then the table holds just one)."""
    from plasticity.config import layer_sets

    sets = layer_sets(cfg.plasticity.layers)
    if sets:
        return ",".join(str(x) for x in sets[0])
    return plas_all[0]["layers"]


def _matrix_markdown(cfg, metric, layers, operator, cells, sources, targets, null_slopes, null_max,
                     stats, windows) -> list[str]:
    p = cfg.plasticity
    n = next(iter(cells.values()))["n"] if cells else 0
    lines = [
        f"Model `{cfg.model.source}`, checkpoints at steps {targets}. Each cell is the slope of the "
        f"change in `{metric}` per unit `alpha_rel` (alpha in units of the target's mean residual "
        f"norm) when the `{p.method}` direction of the source checkpoint steers the target checkpoint "
        f"at layers {layers} with `{operator}`, over alphas {p.alphas}, on {n} items; 95% bootstrap "
        f"CI in brackets. `*`: the CI excludes 0 and the slope beats every one of the "
        f"{p.null_seeds} random directions on that target.",
        "",
        "| source \\ target | " + " | ".join(str(t) for t in targets) + " |",
        "|" + "---|" * (len(targets) + 1),
    ]
    for s in sources:
        cells_md = []
        for t in targets:
            c = cells.get((s, t))
            if c is None:
                cells_md.append("")
                continue
            beats = beats_null(c, null_max.get(t, 0.0))
            cells_md.append(f"{_fmt(c['slope'])}{'*' if beats else ''} [{_fmt(c['slope_ci_low'])}, {_fmt(c['slope_ci_high'])}]")
        lines.append(f"| {s} | " + " | ".join(cells_md) + " |")
    if null_slopes:
        lines += ["", "Random-direction (null) slopes per target: "
                  + "; ".join(f"{t}: " + ", ".join(_fmt(v) for v in vals) for t, vals in sorted(null_slopes.items()))]
    kw = [s for s in stats if s["scope"] == "self" and s["test"] == "kruskal"]
    lines += ["", "## Across checkpoints", ""]
    if kw:
        k = kw[0]
        lines.append(f"Self-plasticity (diagonal), Kruskal-Wallis on per-item slopes: H = {_fmt(k['statistic'])}, "
                     f"p = {k['p_value']:.3g}.")
        dunn_rows = [s for s in stats if s["scope"] == "self" and s["test"] == "dunn"]
        sig = [f"{d['stage_a']} vs {d['stage_b']} (z = {d['statistic']:+.2f}, p_adj = {d['p_adjusted']:.3g})"
               for d in dunn_rows if d["p_adjusted"] < 0.05]
        lines.append("Dunn pairs significant after Bonferroni: " + ("; ".join(sig) if sig else "none") + ".")
        lines.append("Critical windows (above both neighbours, significantly): "
                     + (", ".join(str(w) for w in windows) if windows else "none") + ".")
    else:
        lines.append("Fewer than two checkpoints: no comparison.")
    return lines


def _training_markdown(inter: list[dict], stats: list[dict], metric: str) -> list[str]:
    sel = sorted((r for r in inter if r["metric"] == metric), key=lambda r: r["intervention_step"])
    if not sel:
        return []
    r0 = sel[0]
    lines = ["", "## Training-time intervention", "",
             f"Branches from each snapshot; the loss of the next step is L + {r0['lam']:g}*(L' - L), L' with "
             f"the snapshot's direction added at layer {r0['layer']} (alpha_rel {r0['alpha_rel']:g}); the "
             f"branch trains on to the end and is scored against the run's final model.", "",
             f"| branch step | change in {metric} [95% CI] | final loss (run's: {r0['baseline_final_loss']:.4f}) |",
             "|---|---|---|"]
    for r in sel:
        lines.append(f"| {r['intervention_step']} | {_fmt(r['delta'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] "
                     f"| {r['final_loss']:.4f} |")
    kw = [s for s in stats if s["test"] == "kruskal" and s["metric"] == metric]
    if kw:
        lines.append("")
        lines.append(f"Kruskal-Wallis across branch steps: H = {_fmt(kw[0]['statistic'])}, p = {kw[0]['p_value']:.3g}.")
    return lines


def _directions_markdown(cfg, directions, sim, steered_layer) -> list[str]:
    p = cfg.plasticity
    best = {}
    for r in directions:
        if r["method"] == p.method:
            cur = best.get(r["checkpoint_step"])
            if cur is None or r["detection_accuracy"] > cur[1]:
                best[r["checkpoint_step"]] = (r["layer"], r["detection_accuracy"])
    lines = ["", "## Directions", "",
             "Best layer by test detection accuracy (`" + p.method + "`): "
             + "; ".join(f"step {s}: layer {lay} ({acc:.3f})" for s, (lay, acc) in sorted(best.items())) + "."]
    sim_l = [r for r in sim if r["layer"] == steered_layer and r["step_a"] < r["step_b"]]
    if sim_l:
        lines.append(f"Cosine between checkpoints' directions at layer {steered_layer}: "
                     + "; ".join(f"{r['step_a']}-{r['step_b']}: {r['cosine']:.3f}" for r in sim_l) + ".")
    return lines


def _vocab_markdown(storage, run_id, steered) -> list[str]:
    from plasticity.analysis.vocab_report import vocab_summary_markdown

    try:
        section = vocab_summary_markdown(storage, run_id, steered=steered)
    except FileNotFoundError:
        return []
    return ["", section.strip()] if section else []
