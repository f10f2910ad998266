"""A study's tables, figures and summary, from its Parquet tables alone.

`study_runs` (written by the study flow) says which runs belong to the study, their
group and seed, the headline selection (metric, layers, operator, reader) and the
number of training steps; each finished run's `plasticity_items` gives the per-item
slopes. From them: `study_plasticity` (every cell of the matrix in fractions of
training, averaged over a group's runs, hierarchical CIs, against the null) and
`study_stats` (checkpoints compared with runs as replicates), two figures and
``studies/<study_id>/report/summary.md``.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np

from plasticity.storage.fs import Storage
from plasticity.storage.shards import Rows, read_table, write_shard
from plasticity.study.stats import compare, critical_windows, friedman, hierarchical_bootstrap, holm

log = logging.getLogger(__name__)


def study_path(storage: Storage, study_id: str, *parts: str) -> str:
    return storage.path("studies", study_id, *parts)


def read_study_table(storage: Storage, table: str, study_id: str):
    paths = sorted(storage.fs.glob(storage.path("tables", table, f"study_id={study_id}", "*.parquet")))
    if not paths:
        raise FileNotFoundError(
            f"study {study_id}: no {table} table under {storage.full_uri(storage.path('tables', table))}"
        )
    return read_table(storage, table, paths=paths)


def fraction(step: int, max_steps: int) -> float:
    """Where a checkpoint sits in its run's training, rounded so that runs of different
    lengths meet on the same values (step 3 of 6 and 50 of 100 are both 0.5)."""
    return round(step / max_steps, 6)


@dataclass
class StudyReport:
    markdown: str
    figures: dict[str, bytes] = field(default_factory=dict)
    figure_uris: dict[str, str] = field(default_factory=dict)
    figure_paths: dict[str, str] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    groups: dict[str, dict] = field(default_factory=dict)  # per group: the headline numbers


@dataclass
class _Run:
    run_id: str
    group: str
    seed: int | None
    max_steps: int
    cells: dict[tuple[float, float], np.ndarray]  # (source, target) fraction -> item slopes
    nulls: dict[float, list[np.ndarray]]  # target fraction -> item slopes per null seed


def _load_runs(storage: Storage, runs: list[dict]) -> dict[tuple, list[_Run]]:
    """The finished runs' item slopes of their headline selection, per (group, concept,
    metric, layers, operator)."""
    out: dict[tuple, list[_Run]] = {}
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        return out
    cols = ["run_id", "source_step", "target_step", "concept", "direction", "null_seed", "layers",
            "operator", "metric", "item", "item_slope"]
    items = read_table(storage, "plasticity_items", run_ids=[r["run_id"] for r in done]).select(cols)
    rows_by_run: dict[str, list[dict]] = {}
    for row in items.to_pylist():
        rows_by_run.setdefault(row["run_id"], []).append(row)
    for r in done:
        rows = [x for x in rows_by_run.get(r["run_id"], [])
                if x["metric"] == r["metric"] and x["operator"] == r["operator"]
                and x["concept"] == r["concept"]]
        layers = r["layers"] or (rows[0]["layers"] if rows else "")
        rows = [x for x in rows if x["layers"] == layers]
        if not rows:
            log.warning("study run %s has no plasticity items of its headline selection", r["run_id"])
            continue
        series: dict[tuple, dict[int, float]] = {}
        for x in rows:
            if x["direction"] == r["method"]:
                key = ("cell", x["source_step"], x["target_step"])
            elif x["direction"] == "random":
                key = ("null", x["target_step"], x["null_seed"])
            else:
                continue
            series.setdefault(key, {})[x["item"]] = x["item_slope"]
        vec = {k: np.array([v[i] for i in sorted(v)]) for k, v in series.items()}
        m = r["max_steps"]
        cells = {(fraction(s, m), fraction(t, m)): v for (kind, s, t), v in vec.items() if kind == "cell"}
        nulls: dict[float, list[np.ndarray]] = {}
        for (kind, t, _), v in sorted(vec.items(), key=lambda kv: str(kv[0])):
            if kind == "null":
                nulls.setdefault(fraction(t, m), []).append(v)
        key = (r["group"], r["concept"], r["metric"], layers, r["operator"])
        out.setdefault(key, []).append(_Run(r["run_id"], r["group"], r["seed"], m, cells, nulls))
    return out


def _null_items(run: _Run, target: float, n_items: int) -> np.ndarray | None:
    """Per item, the mean slope of the run's null directions on `target`."""
    vals = [v for v in run.nulls.get(target, []) if len(v) == n_items]
    return np.mean(vals, axis=0) if vals else None


def _group_tables(key: tuple, runs: list[_Run], n_resamples: int, seed: int,
                  plas: Rows, stats: Rows) -> dict:
    group, concept, metric, layers, operator = key
    common = dict(group=group, concept=concept, metric=metric, layers=layers, operator=operator)
    runs = sorted(runs, key=lambda r: (r.seed is None, r.seed, r.run_id))
    all_cells = sorted({c for r in runs for c in r.cells})
    headline: dict = {"runs": [r.run_id for r in runs], "cells": {}}
    for cell in all_cells:
        have = [r for r in runs if cell in r.cells]
        slopes = [r.cells[cell] for r in have]
        mean, lo, hi = hierarchical_bootstrap(slopes, n_resamples, seed)
        run_means = np.array([s.mean() for s in slopes])
        null_runs = [(r, _null_items(r, cell[1], len(r.cells[cell]))) for r in have]
        diffs = [r.cells[cell] - n for r, n in null_runs if n is not None]
        if diffs:
            null_slope = float(np.mean([n.mean() for _, n in null_runs if n is not None]))
            above, a_lo, a_hi = hierarchical_bootstrap(diffs, n_resamples, seed)
        else:
            null_slope = above = a_lo = a_hi = float("nan")
        runs_above = sum(
            1 for r in have
            if r.nulls.get(cell[1]) and r.cells[cell].mean() > max(v.mean() for v in r.nulls[cell[1]])
        )
        plas.add(**common, source_fraction=cell[0], target_fraction=cell[1], n_runs=len(have),
                 n_items=int(np.mean([len(s) for s in slopes])), slope=mean,
                 seed_sd=float(run_means.std(ddof=1)) if len(have) > 1 else float("nan"),
                 ci_low=lo, ci_high=hi, null_slope=null_slope, above_null=above,
                 above_null_ci_low=a_lo, above_null_ci_high=a_hi, runs_above_null=runs_above)
        headline["cells"][cell] = dict(slope=mean, ci_low=lo, ci_high=hi, null=null_slope,
                                       above_null=above, above_lo=a_lo, above_hi=a_hi,
                                       runs_above=runs_above, n_runs=len(have),
                                       per_run=run_means.tolist())

    # Self-plasticity across checkpoints: the fractions every run of the group has.
    fracs = sorted({c[0] for c in all_cells if c[0] == c[1]
                    and all((c[0], c[0]) in r.cells for r in runs)})
    headline["fractions"] = fracs
    headline["n_runs"] = len(runs)
    if len(fracs) < 2:
        headline.update(windows=[], comparisons={}, friedman=(float("nan"), float("nan")))
        return headline
    diag = {f: [r.cells[(f, f)] for r in runs] for f in fracs}
    run_means = np.array([[r.cells[(f, f)].mean() for f in fracs] for r in runs])
    chi2, p = friedman(run_means)
    stats.add(**common, test="friedman", fraction_a=None, fraction_b=None, statistic=chi2,
              p_value=p, p_adjusted=p, diff=None, ci_low=None, ci_high=None, n_runs=len(runs),
              n_agree=None, critical_window=None)
    pairs = [("neighbours", fracs[i + 1], fracs[i]) for i in range(len(fracs) - 1)]
    pairs += [("base", fracs[0], f) for f in fracs[1:]]
    comps = {}
    for test, a, b in pairs:
        comps[(test, a, b)] = compare(a, b, diag[a], diag[b], n_resamples, seed)
    # Holm over every paired comparison of this group.
    order = list(comps)
    adjusted = dict(zip(order, holm([comps[k].p_value for k in order]), strict=True))
    for (test, a, b), c in comps.items():
        stats.add(**common, test=test, fraction_a=a, fraction_b=b, statistic=c.t,
                  p_value=c.p_value, p_adjusted=adjusted[(test, a, b)], diff=c.diff,
                  ci_low=c.ci_low, ci_high=c.ci_high, n_runs=c.n_runs, n_agree=c.n_agree,
                  critical_window=None)
    # Both sides of every interior checkpoint, for the window call.
    sides = {}
    for s in range(1, len(fracs) - 1):
        for o in (s - 1, s + 1):
            sides[(fracs[s], fracs[o])] = compare(fracs[s], fracs[o], diag[fracs[s]], diag[fracs[o]],
                                                  n_resamples, seed)
    flags = critical_windows(fracs, run_means, sides)
    for s, f in enumerate(fracs):
        stats.add(**common, test="window", fraction_a=f, fraction_b=None,
                  statistic=float(run_means[:, s].mean()), p_value=None, p_adjusted=None, diff=None,
                  ci_low=None, ci_high=None, n_runs=len(runs),
                  n_agree=None, critical_window=flags[s])
    headline.update(windows=[f for f, w in zip(fracs, flags, strict=True) if w],
                    comparisons={k: (c, adjusted[k]) for k, c in comps.items()},
                    friedman=(chi2, p), run_means=run_means)
    return headline


# -- figures ------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def figure_self(groups: dict[tuple, dict]) -> bytes:
    """Self-plasticity against the fraction of training: a line per group, its
    hierarchical 95% band, each seed thin, the null dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for k, (key, h) in enumerate(sorted(groups.items())):
        fr = h["fractions"] or sorted({c[0] for c in h["cells"] if c[0] == c[1]})
        cells = [h["cells"][(f, f)] for f in fr if (f, f) in h["cells"]]
        if not cells:
            continue
        color = f"C{k}"
        y = np.array([c["slope"] for c in cells])
        ax.plot(fr, y, marker="o", color=color, label=f"{key[0]} ({h['n_runs']} seeds)")
        ax.fill_between(fr, [c["ci_low"] for c in cells], [c["ci_high"] for c in cells],
                        color=color, alpha=0.2)
        if "run_means" in h:
            for row in h["run_means"]:
                ax.plot(fr, row, color=color, lw=0.6, alpha=0.5)
        nulls = [c["null"] for c in cells]
        if any(n == n for n in nulls):
            ax.plot(fr, nulls, color=color, ls="--", lw=0.9, alpha=0.8)
        for w in h.get("windows", []):
            ax.axvspan(w - 0.02, w + 0.02, color=color, alpha=0.15)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("fraction of training (checkpoint step / max steps)")
    ax.set_ylabel("self-plasticity (slope per alpha_rel)")
    ax.set_title("Each checkpoint steered by its own direction: mean over seeds, 95% "
                 "hierarchical CI;\nthin: single seeds; dashed: random directions", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def figure_matrices(groups: dict[tuple, dict]) -> bytes:
    plt = _pyplot()
    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        cells = groups[key]["cells"]
        src = sorted({c[0] for c in cells})
        tgt = sorted({c[1] for c in cells})
        m = np.full((len(src), len(tgt)), np.nan)
        for (s, t), c in cells.items():
            m[src.index(s), tgt.index(t)] = c["slope"]
        lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(tgt)), [f"{t:g}" for t in tgt])
        ax.set_yticks(range(len(src)), [f"{s:g}" for s in src])
        ax.set_xlabel("target (model steered), fraction of training")
        ax.set_ylabel("source (direction), fraction of training")
        ax.set_title(f"{key[0]}: mean over {groups[key]['n_runs']} seeds", fontsize=9)
        small = len(tgt) > 5
        for (s, t), c in cells.items():
            text = f"{c['slope']:.2g}" if small else f"{c['slope']:.2g}\n[{c['ci_low']:.2g}, {c['ci_high']:.2g}]"
            ax.text(tgt.index(t), src.index(s), text, ha="center", va="center", fontsize=6 if small else 7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


# -- the summary ---------------------------------------------------------------------------


def _f(x) -> str:
    return "nan" if x is None or x != x else f"{x:+.3g}"


def _held(c, p_adj: float) -> str:
    """'held': the hierarchical CI excludes 0, every run agrees in sign and the paired t
    test over runs rejects (Holm, 0.05); 'ci only': the first two without the test; 'no'."""
    if not ((c.ci_low > 0 or c.ci_high < 0) and c.n_agree == c.n_runs):
        return "no"
    return "held" if p_adj == p_adj and p_adj < 0.05 else "ci only"


def _group_markdown(key: tuple, h: dict) -> list[str]:
    group, concept, metric, layers, operator = key
    lines = [f"## {group}", "",
             f"{h['n_runs']} runs ({', '.join(f'`{r}`' for r in h['runs'])}); `{metric}` slope per "
             f"unit alpha_rel, layers {layers}, `{operator}`. Mean over runs, 95% hierarchical "
             "bootstrap CI (runs, then items); null: the random directions of the same norm.", "",
             "| fraction of training | self-plasticity [95% CI] | null | above null [95% CI] | runs above every null |",
             "|---|---|---|---|---|"]
    for f in h["fractions"]:
        c = h["cells"][(f, f)]
        lines.append(f"| {f:.3g} | {_f(c['slope'])} [{_f(c['ci_low'])}, {_f(c['ci_high'])}] | {_f(c['null'])} "
                     f"| {_f(c['above_null'])} [{_f(c['above_lo'])}, {_f(c['above_hi'])}] "
                     f"| {c['runs_above']}/{c['n_runs']} |")
    comps = h.get("comparisons", {})
    if comps:
        chi2, p = h["friedman"]
        lines += ["", f"Friedman across checkpoints (runs as blocks): chi2 = {_f(chi2)}, p = {p:.3g}."
                  if p == p else "", ""]
        base = [(k, v) for k, v in comps.items() if k[0] == "base"]
        if base:
            (test, a, b), (c, p_adj) = base[0]
            verdict = {
                "held": "survives seed variance",
                "ci only": "has a CI clear of 0 and every run agrees, but the paired t test "
                           "over runs does not reject at 0.05: not established with this many runs",
                "no": "does not survive seed variance",
            }[_held(c, p_adj)]
            lines.append(
                f"Base ({a:.3g}) minus the next checkpoint ({b:.3g}): {_f(c.diff)} [{_f(c.ci_low)}, {_f(c.ci_high)}], "
                f"{c.n_agree}/{c.n_runs} runs agree in sign, paired t p_holm = {p_adj:.3g}: the "
                f"{'drop' if c.diff > 0 else 'rise'} after the base checkpoint {verdict}."
            )
        lines.append("Critical windows (above both neighbours in every run, both CIs above 0): "
                     + (", ".join(f"{w:.3g}" for w in h["windows"]) if h["windows"] else "none") + ".")
    return lines


def _run_rows(runs: list[dict], storage: Storage) -> list[str]:
    lines = ["## Runs", "", "| run | group | seed | status | report |", "|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r["run_id"]):
        report = storage.full_uri(storage.path("runs", r["run_id"], "report", "summary.md"))
        status = r["status"] + (f": {r['error'][:120]}" if r.get("error") else "")
        lines.append(f"| `{r['run_id']}` | {r['group']} | {r['seed']} | {status} | "
                     f"[summary.md]({report}) |")
    return lines


def build_study_report(storage: Storage, study_id: str, n_resamples: int = 2000,
                       seed: int = 0) -> StudyReport:
    """Study tables, figures and summary from `study_runs` and the runs' tables."""
    runs = read_study_table(storage, "study_runs", study_id).to_pylist()
    by_key = _load_runs(storage, runs)
    plas, stats = Rows("study_plasticity"), Rows("study_stats")
    groups = {key: _group_tables(key, rs, n_resamples, seed, plas, stats) for key, rs in sorted(by_key.items())}
    rep = StudyReport(markdown="", groups={k[0]: v for k, v in groups.items()})
    part = {"study_id": study_id}
    rep.shards.append(write_shard(storage, "study_plasticity", part, "plasticity", plas.columns))
    rep.shards.append(write_shard(storage, "study_stats", part, "stats", stats.columns))
    if groups:
        rep.figures["self_plasticity"] = figure_self(groups)
        rep.figures["plasticity_matrix"] = figure_matrices(groups)
    out_dir = study_path(storage, study_id, "report")
    for name, png in rep.figures.items():
        path = posixpath.join(out_dir, f"{name}.png")
        storage.write_bytes(path, png)
        rep.figure_paths[name] = path
        rep.figure_uris[name] = storage.full_uri(path)
    done = sum(r["status"] == "done" for r in runs)
    lines = [f"# Study `{study_id}`", "",
             f"{len(runs)} runs, {done} finished; {len(groups)} groups. Checkpoints are placed by "
             "their fraction of training, so runs of different lengths line up.", ""]
    for key, h in groups.items():
        lines += _group_markdown(key, h) + [""]
    if len(groups) > 1:
        drops = {k[0]: h["comparisons"].get(("base", h["fractions"][0], h["fractions"][1]))
                 for k, h in groups.items() if h.get("comparisons")}
        drops = {g: c for g, c in drops.items() if c}
        if drops:
            def word(c, p_adj) -> str:
                tail = {"held": "", "ci only": " (CI clear of 0, paired t not significant)",
                        "no": " (within seed variance)"}[_held(c, p_adj)]
                return f"{'drop' if c.diff > 0 else 'rise'}{tail}"

            falls = {g: c.diff > 0 for g, (c, _) in drops.items()}
            lines += ["## Across groups", "",
                      "Mean self-plasticity after the base checkpoint "
                      + ("falls in every group" if all(falls.values()) else
                         "rises in every group" if not any(falls.values()) else "falls in some groups only")
                      + ": " + ", ".join(f"{g}: {word(c, p)}" for g, (c, p) in sorted(drops.items())) + ".", ""]
    lines += _run_rows(runs, storage)
    lines += ["", "## Figures", ""] + [f"- `{n}.png`: {rep.figure_uris[n]}" for n in rep.figures]
    lines += ["", "Tables: " + ", ".join(
        f"`{t}` ({storage.full_uri(storage.path('tables', t, f'study_id={study_id}'))})"
        for t in ("study_runs", "study_plasticity", "study_stats"))]
    rep.markdown = "\n".join(lines) + "\n"
    storage.write_bytes(posixpath.join(out_dir, "summary.md"), rep.markdown.encode())
    return rep


def axes_json(values: dict) -> str:
    return json.dumps(values, sort_keys=True, default=str)
