"""The vocabulary section of a run's report, from the `vocab_topk`, `directions` and
`delta_stats` tables."""

from __future__ import annotations

from plasticity.storage.fs import Storage
from plasticity.storage.shards import read_table


def _fmt_tokens(rows: list[dict], n: int) -> str:
    rows = sorted(rows, key=lambda r: r["rank"])[:n]
    return ", ".join(f"`{r['token']!r}`"[0:40] for r in rows) or "-"


def vocab_summary_markdown(storage: Storage, run_id: str, n_tokens: int = 8, n_deltas: int = 3,
                           steered: tuple[str, int] | None = None) -> str:
    """A Markdown section: per checkpoint, the top and bottom tokens of the honesty
    direction at its best layer (by test detection accuracy, any reader but `random`),
    and at the steered layer (`steered`: the steering reader and layer) when that is
    another one: the best layer is often an early one, whose projection through the
    unembedding reads as sub-word noise. Then the largest weight deltas (by relative
    norm) with the top tokens of their first singular vector. Raises FileNotFoundError
    when the run has no vocab output."""
    topk = read_table(storage, "vocab_topk", [run_id]).to_pylist()
    try:
        directions = read_table(storage, "directions", [run_id]).select(
            ["checkpoint_step", "concept", "layer", "method", "detection_accuracy"]
        ).to_pylist()
    except FileNotFoundError:
        directions = []
    try:
        deltas = read_table(storage, "delta_stats", [run_id]).to_pylist()
    except FileNotFoundError:
        deltas = []
    by_key: dict[tuple, list[dict]] = {}
    for r in topk:
        if r["variant"] != "raw":
            continue
        by_key.setdefault((r["checkpoint_step"], r["object"], r["layer"], r["index"], r["sign"]), []).append(r)
    lines = ["## Vocabulary space", ""]
    steps = sorted({r["checkpoint_step"] for r in topk})
    method_order = {"pca": 0, "mean_diff": 1}
    for step in steps:
        lines.append(f"### Step {step}")
        lines.append("")
        cands = [r for r in directions if r["checkpoint_step"] == step and r["method"] != "random"]
        if cands:
            best = max(cands, key=lambda r: (r["detection_accuracy"], -method_order.get(r["method"], 9), -r["layer"]))
            obj = f"direction_{best['method']}"
            top = by_key.get((step, obj, best["layer"], 0, 1), [])
            bot = by_key.get((step, obj, best["layer"], 0, -1), [])
            lines.append(
                f"{best['concept']} direction (`{best['method']}`, layer {best['layer']}, test "
                f"detection accuracy {best['detection_accuracy']:.3f}, the best layer): promotes "
                f"{_fmt_tokens(top, n_tokens)}; suppresses {_fmt_tokens(bot, n_tokens)}."
            )
            lines.append("")
            if steered is not None and (steered[0], steered[1]) != (best["method"], best["layer"]):
                method, layer = steered
                row = next((r for r in cands if r["method"] == method and r["layer"] == layer), None)
                top = by_key.get((step, f"direction_{method}", layer, 0, 1), [])
                bot = by_key.get((step, f"direction_{method}", layer, 0, -1), [])
                if top or bot:
                    acc = f", test detection accuracy {row['detection_accuracy']:.3f}" if row else ""
                    lines.append(
                        f"At the steered layer (`{method}`, layer {layer}{acc}): promotes "
                        f"{_fmt_tokens(top, n_tokens)}; suppresses {_fmt_tokens(bot, n_tokens)}."
                    )
                    lines.append("")
        mats = [r for r in deltas if r["checkpoint_step"] == step and r["head"] is None and r["layer"] is not None]
        mats.sort(key=lambda r: -(r["relative_delta_norm"] or 0.0))
        if mats:
            lines += ["| weight delta | layer | relative norm | top tokens of its first singular vector |",
                      "|---|---|---|---|"]
            for r in mats[:n_deltas]:
                toks = by_key.get((step, f"svd_{r['param']}", r["layer"], 0, 1), [])
                lines.append(
                    f"| {r['param']} | {r['layer']} | {r['relative_delta_norm']:.3g} | {_fmt_tokens(toks, n_tokens)} |"
                )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
