"""Parquet table schemas, version 1 (see README's table list).

Partition columns (`run_id`, `checkpoint_step`, …) live in the Hive path, not in the
files; readers get them back through Hive partitioning with the types given here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1
D_MODEL = "__d_model__"  # placeholder width of vector columns, fixed at write time


@dataclass(frozen=True)
class TableSpec:
    name: str
    partitions: tuple[tuple[str, pa.DataType], ...]
    columns: tuple[tuple[str, object], ...]

    def schema(self, d_model: int | None = None) -> pa.Schema:
        fields = []
        for name, tp in self.columns:
            if tp is D_MODEL or (isinstance(tp, tuple) and tp[1] is D_MODEL):
                if d_model is None:
                    raise ValueError(f"table {self.name}: column {name} needs d_model")
                value_type = tp[0] if isinstance(tp, tuple) else pa.float32()
                tp = pa.list_(value_type, d_model)
            fields.append(pa.field(name, tp))
        fields.append(pa.field("schema_version", pa.int32()))
        return pa.schema(fields)

    def partition_schema(self) -> pa.Schema:
        return pa.schema([pa.field(n, t) for n, t in self.partitions])

    @property
    def column_names(self) -> list[str]:
        return [n for n, _ in self.partitions] + [n for n, _ in self.columns] + ["schema_version"]


_ts = pa.timestamp("us", tz="UTC")
_RUN = (("run_id", pa.string()),)
_RUN_STEP = (("run_id", pa.string()), ("checkpoint_step", pa.int64()))
_STUDY = (("study_id", pa.string()),)

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in [
        TableSpec(
            "train_metrics",
            _RUN,
            (
                ("step", pa.int64()), ("epoch", pa.float64()), ("loss", pa.float64()),
                ("lr", pa.float64()), ("grad_norm", pa.float64()), ("tokens_seen", pa.int64()),
                ("step_time_s", pa.float64()), ("optimizer", pa.string()),
                ("optimizer_state_bytes", pa.int64()), ("wall_time", _ts),
            ),
        ),
        TableSpec(
            "eval_metrics",
            _RUN,
            (
                ("step", pa.int64()), ("split", pa.string()), ("loss", pa.float64()),
                ("perplexity", pa.float64()), ("metric", pa.string()), ("value", pa.float64()),
            ),
        ),
        TableSpec(
            "checkpoints",
            _RUN,
            (
                ("step", pa.int64()), ("uri", pa.string()), ("sha256", pa.string()),
                ("n_params", pa.int64()), ("bytes", pa.int64()), ("created_at", _ts),
            ),
        ),
        TableSpec(
            "activations",
            (*_RUN_STEP, ("layer", pa.int32())),
            (
                ("concept", pa.string()), ("split", pa.string()), ("example_id", pa.int64()),
                ("pair_id", pa.int64()), ("label", pa.int8()), ("token_index", pa.int32()),
                ("hidden", (pa.float16(), D_MODEL)),
            ),
        ),
        TableSpec(
            "directions",
            _RUN_STEP,
            (
                ("concept", pa.string()), ("layer", pa.int32()), ("method", pa.string()),
                ("sign", pa.int8()), ("explained_variance", pa.float64()),
                ("detection_accuracy", pa.float64()), ("residual_norm", pa.float64()),
                ("vector", (pa.float32(), D_MODEL)),
            ),
        ),
        TableSpec(
            "plasticity",
            (("run_id", pa.string()), ("source_step", pa.int64())),
            (
                ("target_step", pa.int64()), ("concept", pa.string()), ("direction", pa.string()),
                ("null_seed", pa.int32()), ("layers", pa.string()),
                ("operator", pa.string()), ("alpha", pa.float64()), ("alpha_rel", pa.float64()),
                ("metric", pa.string()), ("value", pa.float64()), ("baseline", pa.float64()),
                ("delta", pa.float64()), ("n", pa.int64()), ("ci_low", pa.float64()),
                ("ci_high", pa.float64()), ("slope", pa.float64()),
                ("slope_ci_low", pa.float64()), ("slope_ci_high", pa.float64()),
            ),
        ),
        TableSpec(
            "plasticity_items",
            (("run_id", pa.string()), ("source_step", pa.int64())),
            (
                ("target_step", pa.int64()), ("concept", pa.string()), ("direction", pa.string()),
                ("null_seed", pa.int32()), ("layers", pa.string()), ("operator", pa.string()),
                ("metric", pa.string()), ("item", pa.int64()), ("alpha_rel", pa.float64()),
                ("value", pa.float64()), ("baseline", pa.float64()), ("delta", pa.float64()),
                ("item_slope", pa.float64()),
            ),
        ),
        TableSpec(
            "intervention",
            _RUN,
            (
                ("intervention_step", pa.int64()), ("concept", pa.string()), ("layer", pa.int32()),
                ("lam", pa.float64()), ("alpha_rel", pa.float64()), ("metric", pa.string()),
                ("value", pa.float64()), ("baseline", pa.float64()), ("delta", pa.float64()),
                ("n", pa.int64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
                ("final_loss", pa.float64()), ("baseline_final_loss", pa.float64()),
            ),
        ),
        TableSpec(
            "intervention_items",
            _RUN,
            (
                ("intervention_step", pa.int64()), ("concept", pa.string()), ("layer", pa.int32()),
                ("metric", pa.string()), ("item", pa.int64()), ("value", pa.float64()),
                ("baseline", pa.float64()), ("delta", pa.float64()),
            ),
        ),
        TableSpec(
            "plasticity_stats",
            _RUN,
            (
                ("scope", pa.string()), ("concept", pa.string()), ("layers", pa.string()),
                ("operator", pa.string()), ("metric", pa.string()), ("test", pa.string()),
                ("stage_a", pa.int64()), ("stage_b", pa.int64()), ("statistic", pa.float64()),
                ("p_value", pa.float64()), ("p_adjusted", pa.float64()),
                ("critical_window", pa.bool_()),
            ),
        ),
        TableSpec(
            "direction_similarity",
            _RUN,
            (
                ("concept", pa.string()), ("layer", pa.int32()), ("step_a", pa.int64()),
                ("step_b", pa.int64()), ("cosine", pa.float64()),
            ),
        ),
        TableSpec(
            "vocab_topk",
            _RUN_STEP,
            (
                ("object", pa.string()), ("variant", pa.string()), ("layer", pa.int32()),
                ("head", pa.int32()), ("index", pa.int64()), ("sign", pa.int8()),
                ("rank", pa.int32()), ("token_id", pa.int64()), ("token", pa.string()),
                ("score", pa.float64()),
            ),
        ),
        TableSpec(
            "circuit_topk",
            _RUN_STEP,
            (
                ("circuit", pa.string()), ("layer", pa.int32()), ("head", pa.int32()),
                ("sign", pa.int8()), ("rank", pa.int32()), ("src_token_id", pa.int64()),
                ("dst_token_id", pa.int64()), ("src_token", pa.string()),
                ("dst_token", pa.string()), ("score", pa.float64()),
            ),
        ),
        TableSpec(
            "concept_scores",
            _RUN_STEP,
            (
                ("object", pa.string()), ("layer", pa.int32()), ("head", pa.int32()),
                ("index", pa.int64()), ("sign", pa.int8()), ("concept", pa.string()),
                ("variant", pa.string()), ("k", pa.int32()), ("precision_at_k", pa.float64()),
                ("auroc", pa.float64()), ("mean_rank", pa.float64()),
                ("null_percentile", pa.float64()),
            ),
        ),
        TableSpec(
            "vocab_similarity",
            _RUN,
            (
                ("object", pa.string()), ("variant", pa.string()), ("layer", pa.int32()),
                ("head", pa.int32()), ("index", pa.int64()), ("step_a", pa.int64()),
                ("step_b", pa.int64()), ("k", pa.int32()), ("jaccard_at_k", pa.float64()),
                ("jaccard_bottom_at_k", pa.float64()), ("spearman", pa.float64()),
                ("vocab_cosine", pa.float64()),
            ),
        ),
        TableSpec(
            "vocab_alignment",
            _RUN,
            (
                ("object", pa.string()), ("step_a", pa.int64()), ("step_b", pa.int64()),
                ("layer_a", pa.int32()), ("layer_b", pa.int32()), ("n_vectors", pa.int32()),
                ("correlation", pa.float64()), ("layer_match", pa.bool_()),
            ),
        ),
        TableSpec(
            "delta_stats",
            _RUN_STEP,
            (
                ("param", pa.string()), ("layer", pa.int32()), ("head", pa.int32()),
                ("delta_norm", pa.float64()), ("relative_delta_norm", pa.float64()),
                ("top_singular_values", pa.list_(pa.float64())),
            ),
        ),
        # Study tables: one partition per study; a study's runs are its rows.
        TableSpec(
            "study_runs",
            _STUDY,
            (
                ("run_id", pa.string()), ("group", pa.string()), ("seed", pa.int64()),
                ("axes", pa.string()), ("model", pa.string()), ("concept", pa.string()),
                ("method", pa.string()), ("metric", pa.string()), ("layers", pa.string()),
                ("operator", pa.string()), ("max_steps", pa.int64()),
                ("snapshot_steps", pa.list_(pa.int64())), ("status", pa.string()),
                ("error", pa.string()),
            ),
        ),
        TableSpec(
            "study_plasticity",
            _STUDY,
            (
                ("group", pa.string()), ("concept", pa.string()), ("metric", pa.string()),
                ("layers", pa.string()), ("operator", pa.string()),
                ("source_fraction", pa.float64()), ("target_fraction", pa.float64()),
                ("n_runs", pa.int64()), ("n_items", pa.int64()), ("slope", pa.float64()),
                ("seed_sd", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
                ("null_slope", pa.float64()), ("above_null", pa.float64()),
                ("above_null_ci_low", pa.float64()), ("above_null_ci_high", pa.float64()),
                ("runs_above_null", pa.int64()),
            ),
        ),
        TableSpec(
            "study_stats",
            _STUDY,
            (
                ("group", pa.string()), ("concept", pa.string()), ("metric", pa.string()),
                ("layers", pa.string()), ("operator", pa.string()), ("test", pa.string()),
                ("fraction_a", pa.float64()), ("fraction_b", pa.float64()),
                ("statistic", pa.float64()), ("p_value", pa.float64()),
                ("p_adjusted", pa.float64()), ("diff", pa.float64()), ("ci_low", pa.float64()),
                ("ci_high", pa.float64()), ("n_runs", pa.int64()), ("n_agree", pa.int64()),
                ("critical_window", pa.bool_()),
            ),
        ),
        TableSpec(
            "token_meta",
            _RUN,
            (
                ("token_id", pa.int64()), ("token", pa.string()), ("leading_space", pa.bool_()),
                ("is_alpha", pa.bool_()), ("concept", pa.string()),
            ),
        ),
    ]
}
