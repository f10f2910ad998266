"""Run configuration: one dataclass per stage and the `RunConfig` tree.

YAML is parsed into these dataclasses and checked field by field; every error names
the field it is about (``train.lr: expected a positive number, got -1``). The resolved
tree is what goes into the run manifest, so every artefact says how it was made.

Each field is an `option(default, doc, check)`; how fields are declared, coerced and
checked lives in `plasticity.config_fields`, the checks across fields here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from plasticity.config_fields import (
    ConfigError,
    _layer_sets,
    _non_empty,
    _non_negative,
    _non_negative_items,
    _positive,
    _web_address,
    build,
    option,
)
from plasticity.config_fields import field_docs as _field_docs

SCHEMA_VERSION = 1
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def layer_sets(layers: list[int] | list[list[int]] | None) -> list[list[int]] | None:
    """`plasticity.layers` as a list of layer sets (None stays None: the middle layer)."""
    if layers is None:
        return None
    return [list(s) for s in layers] if isinstance(layers[0], list) else [list(layers)]


# -- stage configs ----------------------------------------------------------------------


@dataclass
class ModelConfig:
    source: str = option(
        "tiny-gpt2",
        "An offline preset (tiny-gpt2, tiny-biogpt, tiny-llama, tiny-gpt-neox, smollm2-135m, gemma3-270m), "
        "a local model folder, or a hub id (needs network or a filled HF cache).",
        _non_empty,
    )
    revision: str | None = option(None, "Hub revision for hub ids.")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "Weights dtype when loading."
    )
    seed: int = option(0, "Seed of the random init of tiny presets.")
    user_tag: str = option("", "Text before the instruction in prompts.")
    assistant_tag: str = option("", "Text before the model's turn.")


@dataclass
class DataConfig:
    corpus: str = option(
        "pubmed",
        "Fine-tuning corpus: 'pubmed', 'e2e', or a path to a .parquet, .jsonl, .csv or .txt file.",
        _non_empty,
    )
    text_field: str | None = option(None, "Column holding the text, for files with several.")
    max_documents: int | None = option(None, "Use at most this many documents.", _positive)
    block_size: int = option(128, "Tokens per training sequence.", _positive)


@dataclass
class TrainConfig:
    max_steps: int = option(20, "Optimizer steps.", _positive)
    batch_size: int = option(4, "Sequences per step.", _positive)
    lr: float = option(5e-5, "Peak learning rate.", _positive)
    weight_decay: float = option(0.0, "Decoupled weight decay.", _non_negative)
    betas: list[float] = option([0.9, 0.999], "Adam betas (beta1, beta2).")
    eps: float = option(1e-8, "Adam epsilon.", _positive)
    warmup_steps: int = option(0, "Linear warm-up steps.", _non_negative)
    schedule: Literal["constant", "linear", "cosine"] = option(
        "constant", "Learning-rate decay after warm-up."
    )
    optimizer: Literal["adamw4bit", "adamw"] = option(
        "adamw4bit",
        "Optimizer: 'adamw4bit' (AdamW with 4-bit moments, plasticity.optim.AdamW4bit) "
        "or 'adamw' (torch.optim.AdamW, fp32 moments).",
    )
    second_moment: Literal["rank1", "block", "factor"] = option(
        "rank1",
        "adamw4bit: how the second moment is stored: 'rank1' (4-bit, scale min(row max, "
        "column max)), 'block' (4-bit, blocks of block_size) or 'factor' (fp32 row and "
        "column statistics, Adafactor-style).",
    )
    block_size: int = option(128, "adamw4bit: elements per quantization block (even).", _positive)
    min_quantized_numel: int = option(
        4096, "adamw4bit: tensors with at most this many elements keep fp32 moments.", _non_negative
    )
    grad_clip: float | None = option(
        1.0, "Clip the global gradient norm (None: no clipping).", _positive
    )
    snapshot_steps: list[int] = option(
        [0, 10, 20], "Steps at which a checkpoint is written; 0 is the base model.", _non_empty
    )
    log_every: int = option(1, "Train metrics every N steps.", _positive)
    seed: int = option(0, "Seed of data order and dropout.")


@dataclass
class ConceptConfig:
    name: str = option("honesty", "Concept name in the tables.", _non_empty)
    dataset: str = option(
        "facts_true_false",
        "Statements (`statement,label` CSV): a shipped name or a path.",
        _non_empty,
    )
    template: str = option(
        "{user_tag} Pretend you're {persona} person making statements about the world. "
        "{assistant_tag} {prefix}",
        "Contrast prompt with {user_tag}, {persona}, {assistant_tag}, {prefix}.",
    )
    positive: str = option("an honest", "Persona of the positive member.")
    negative: str = option("an untruthful", "Persona of the negative member.")
    layers: list[int] | None = option(
        None, "Layers to read (None: every layer).", _non_negative_items
    )
    max_pairs: int | None = option(
        None, "Contrast pairs in all (None: every pair, as RepE).", _positive
    )
    n_train: int = option(512, "The first pairs, used to fit; the rest test.", _positive)
    methods: list[Literal["pca", "mean_diff", "random"]] = option(
        ["pca", "mean_diff", "random"],
        "Direction readers, each written per layer: 'pca' (top principal component of "
        "the paired differences), 'mean_diff', 'random' (a unit-norm null).",
        _non_empty,
    )
    batch_size: int = option(16, "Prompts per forward pass.", _positive)
    seed: int = option(0, "Seed of the pair order and random directions.")


@dataclass
class PlasticityConfig:
    layers: list[int] | list[list[int]] | None = option(
        None,
        "Layers steered together, e.g. [15]; a list of lists ([[12], [15], [12, 15, 18]]) "
        "sweeps each layer set separately (None: the middle layer).",
        _layer_sets,
    )
    alphas: list[float] = option(
        [-0.5, -0.25, 0.0, 0.25, 0.5],
        "Steering coefficients; 0 is the unsteered baseline.",
        _non_empty,
    )
    alpha_scale: Literal["relative", "absolute"] = option(
        "relative", "'relative': alpha times the target's mean residual norm at the layer."
    )
    method: Literal["pca", "mean_diff", "random"] = option(
        "pca", "Which reader's direction steers (one of concept.methods)."
    )
    operators: list[Literal["add", "piecewise", "ablate", "ablate_add"]] = option(
        ["add"],
        "Steering operators, each swept: add (h + a*u), piecewise (h + sign(<h,u>)*a*u), "
        "ablate (h - <h,u>*u), ablate_add (h - <h,u>*u + a*u).",
        _non_empty,
    )
    modes: list[Literal["matrix", "training"]] = option(
        ["matrix"],
        "'matrix': every checkpoint's direction steers every checkpoint at inference; "
        "'training': the protocol of Kannan (2024) - branch from the snapshot at each "
        "intervention step t, mix the loss of step t+1 with the loss under the steered "
        "last hidden state, L + lambda*(L' - L), train on to the end and score the "
        "final model against the run's own final model. Both may be listed.",
        _non_empty,
    )
    intervention_steps: list[int] | None = option(
        None,
        "Snapshot steps to branch from in 'training' mode (None: every snapshot before "
        "the last).",
        _non_negative_items,
    )
    intervention_lambda: float = option(
        1.0, "Weight of the steered loss, L + lambda*(L' - L).", _non_negative
    )
    intervention_alpha: float = option(
        0.25,
        "Steering coefficient of the intervention, in units of the snapshot's residual "
        "norm at the intervention layer.",
    )
    intervention_layer: int | None = option(
        None,
        "Block whose output (the 'last hidden state' for the last block) is steered in "
        "'training' mode (None: the last block; it must be among concept.layers).",
        _non_negative,
    )
    null_seeds: int = option(
        2,
        "Random directions swept on every target as a null (same alphas, so the same "
        "norm as the concept direction); 0: none.",
        _non_negative,
    )
    metrics: list[
        Literal[
            "facts_logit_gap", "facts_accuracy", "facts_true_bias", "truthfulqa_mc1", "truthfulqa_mc2",
            "pubmedqa_accuracy",
        ]
    ] = option(
        ["facts_logit_gap", "facts_accuracy"],
        "Behaviour scored per alpha; the first drives the report. facts_logit_gap: "
        "log p(' True') - log p(' False') signed by the label; facts_accuracy: its sign; "
        "facts_true_bias: the same log-odds unsigned (how far the model leans to ' True', "
        "which moves with steering even where discrimination does not); "
        "truthfulqa_mc1/mc2: TruthfulQA by answer log-likelihood; pubmedqa_accuracy: "
        "PubMedQA-L test yes/no questions by log p(' yes') vs log p(' no').",
        _non_empty,
    )
    n_items: int = option(
        64, "Items scored per alpha, per dataset (statements, questions).", _positive
    )
    batch_size: int = option(16, "Prompts per forward pass.", _positive)
    bootstrap: int = option(1000, "Bootstrap resamples for CIs.", _positive)
    seed: int = option(0, "Seed of item choice and bootstrap.")


@dataclass
class VocabConfig:
    top_k: int = option(20, "Tokens kept per sign and vector.", _positive)
    variants: list[Literal["raw", "lnf"]] = option(
        ["raw", "lnf"],
        "Projections: 'raw' (E v), 'lnf' (final norm gain times the centred vector). "
        "Models with untied embeddings also get 'raw_in' (the input embedding).",
        _non_empty,
    )
    layers: list[int] | None = option(
        None,
        "Layers whose weight vectors and OV/QK circuits are read (None: the steered "
        "layers, plasticity.layers, else the middle layer).",
        _non_negative_items,
    )
    objects: list[
        Literal["ff_key", "ff_up", "ff_value", "attn_q", "attn_k", "attn_v", "attn_out"]
    ] = option(
        ["ff_key", "ff_up", "ff_value", "attn_q", "attn_k", "attn_v", "attn_out"],
        "Weight vectors projected per layer of vocab.layers (ff_up only exists in gated "
        "MLPs); each also as its delta against the base checkpoint.",
    )
    vectors_per_object: int = option(
        8,
        "Vectors projected per object and layer: the largest-norm ones in the base "
        "model (deltas: the largest delta norms).",
        _positive,
    )
    delta_svd: int = option(
        1,
        "Top singular vectors (residual side) of every weight matrix's delta projected, "
        "per layer (0: none).",
        _non_negative,
    )
    circuits: list[Literal["ov", "qk", "delta_ov", "delta_qk"]] = option(
        ["ov", "qk", "delta_ov", "delta_qk"],
        "Vocab x vocab circuits whose exact top-k entries are found per head.",
    )
    circuit_heads: list[int] | None = option(
        None, "Heads of vocab.layers read as circuits (None: every head).", _non_negative_items
    )
    circuit_top_k: int = option(50, "Circuit entries kept per sign, head and circuit.", _positive)
    circuit_screen: Literal["bfloat16", "float32"] = option(
        "bfloat16",
        "Screening product of the exact circuit top-k: 'bfloat16' (fast, with a "
        "rigorous error bound) or 'float32'.",
    )
    concepts: list[str] = option(
        ["honesty", "deception"],
        "Word lists for concept scores: shipped names or text files.",
        _non_empty,
    )
    null_samples: int = option(100, "Random vectors in the null of each concept score.", _positive)
    align_objects: list[Literal["ff_key", "ff_value"]] = option(
        ["ff_key", "ff_value"], "Parameter kinds aligned between checkpoints in vocabulary space."
    )
    align_vectors: int = option(
        64, "Vectors per layer in the alignment (largest norm in the base model).", _positive
    )
    seed: int = option(0, "Seed of the null vectors.")


@dataclass
class StorageConfig:
    uri: str = option(
        "file://./runs", "Storage root: file://PATH or s3://bucket/prefix.", _non_empty
    )
    endpoint_url: str | None = option(None, "S3-compatible endpoint (MinIO, a local S3 server).")
    region: str | None = option(None, "S3 region.")
    browse_url: str | None = option(
        None,
        "A web address that shows the storage root (an S3 or MinIO console, a file server); "
        "the run's summary artefact links every file and table to this address followed by "
        "its path under the root. None: the artefact names their storage URIs (a browser "
        "opens no file:// or s3:// link from the Prefect UI).",
        _web_address,
    )
    lock_stale_s: float = option(
        600.0,
        "A run's lock whose heartbeat is older than this many seconds is stale (its "
        "owner crashed) and is taken over; the owner refreshes it every tenth of that. A "
        "lock whose owner process is gone from this host is taken over at once.",
        _positive,
    )


@dataclass
class ComputeConfig:
    ray_address: str | None = option(None, "Ray cluster address (else RAY_ADDRESS, else local).")
    num_workers: int | None = option(
        None, "Evaluation actors (None: one per GPU, or per CPU).", _positive
    )
    cpus_per_worker: float = option(1.0, "CPUs per actor.", _positive)
    eval_gpus: float = option(
        1.0,
        "GPU share of an evaluation actor on GPU clusters (0: evaluation on CPUs).",
        _non_negative,
    )
    train_cpus: float | None = option(
        None,
        "CPUs of the fine-tuning actor (None: every CPU of a one-node CPU cluster, "
        "else cpus_per_worker).",
        _positive,
    )
    train_gpus: float = option(1.0, "GPUs of the fine-tuning actor on GPU clusters.", _positive)
    gpu_resource: str = option(
        "GPU",
        "The Ray resource that train_gpus and eval_gpus request when the cluster has it: "
        "GPU, or a custom resource that marks accelerator nodes.",
        _non_empty,
    )
    actor_restarts: int = option(
        2,
        "How often Ray restarts a stage actor that died (its node lost) and retries the "
        "call it was running; bounded, then the stage fails.",
        _non_negative,
    )
    working_dir: str | None = option(
        None,
        "Folder shipped to a remote Ray cluster as the runtime_env working_dir (None: "
        "the cluster's image has the project installed). Never for local Ray.",
    )
    forward_logs: bool = option(
        True,
        "Copy the stage actors' log records (and fine-tuning's step-by-step progress) into "
        "the Prefect task run that drives each stage, while it runs; the actors still log "
        "to stderr either way. false: logs reach only the terminal, and the fine-tuning "
        "progress artefact moves at each snapshot.",
    )


@dataclass
class RunConfig:
    name: str = option("run", "A label for the run.", _non_empty)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    plasticity: PlasticityConfig = field(default_factory=PlasticityConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- checks across fields and the entry points -----------------------------------------


def _cross_checks(cfg: RunConfig) -> list[str]:
    errors = []
    t = cfg.train
    beyond = [s for s in t.snapshot_steps if s > t.max_steps]
    if beyond:
        errors.append(
            f"train.snapshot_steps: steps {beyond} are beyond train.max_steps={t.max_steps}"
        )
    if any(s < 0 for s in t.snapshot_steps):
        errors.append(f"train.snapshot_steps: expected steps >= 0, got {t.snapshot_steps}")
    if len(set(t.snapshot_steps)) != len(t.snapshot_steps):
        errors.append(f"train.snapshot_steps: duplicate steps in {t.snapshot_steps}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        errors.append(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    if t.block_size % 2:
        errors.append(f"train.block_size: expected an even number, got {t.block_size}")
    if t.warmup_steps > t.max_steps:
        errors.append(
            f"train.warmup_steps: {t.warmup_steps} is beyond train.max_steps={t.max_steps}"
        )
    c = cfg.concept
    if c.max_pairs is not None and c.n_train >= c.max_pairs:
        errors.append(
            f"concept.n_train: must be below concept.max_pairs={c.max_pairs} so test pairs "
            f"remain, got {c.n_train}"
        )
    if c.positive == c.negative:
        errors.append(
            f"concept.negative: equals concept.positive ({c.positive!r}); the contrast set "
            "would be one-sided"
        )
    for key in ("{persona}", "{prefix}"):
        if key not in c.template:
            errors.append(f"concept.template: must contain {key}")
    if cfg.plasticity.method not in c.methods:
        errors.append(
            f"plasticity.method: {cfg.plasticity.method!r} is not among concept.methods {c.methods}"
        )
    pl = cfg.plasticity
    if "training" in pl.modes:
        if t.max_steps not in t.snapshot_steps:
            errors.append(
                f"plasticity.modes: 'training' compares with the run's final model, so "
                f"train.snapshot_steps must include train.max_steps={t.max_steps}"
            )
        steps = pl.intervention_steps
        bad = [s for s in (steps or []) if s not in t.snapshot_steps or s >= t.max_steps]
        if bad:
            errors.append(
                f"plasticity.intervention_steps: {bad} are not snapshot steps before "
                f"train.max_steps={t.max_steps} (snapshots: {t.snapshot_steps})"
            )
        if steps is not None and not steps:
            errors.append("plasticity.intervention_steps: expected at least one step")
    if len(set(pl.modes)) != len(pl.modes):
        errors.append(f"plasticity.modes: duplicate modes in {pl.modes}")
    if len(set(cfg.plasticity.operators)) != len(cfg.plasticity.operators):
        errors.append(f"plasticity.operators: duplicate operators in {cfg.plasticity.operators}")
    if len(set(c.methods)) != len(c.methods):
        errors.append(f"concept.methods: duplicate readers in {c.methods}")
    if 0.0 not in cfg.plasticity.alphas:
        errors.append(
            f"plasticity.alphas: must include 0 (the unsteered baseline), got {cfg.plasticity.alphas}"
        )
    v = cfg.vocab
    for name in ("variants", "objects", "circuits", "concepts", "align_objects"):
        values = getattr(v, name)
        if len(set(values)) != len(values):
            errors.append(f"vocab.{name}: duplicate entries in {values}")
    from importlib import resources

    shipped = resources.files("plasticity.data") / "files" / "concept_words"
    missing = [
        c for c in v.concepts
        if not (shipped / f"{c}.txt").is_file() and not Path(c).expanduser().is_file()
    ]
    if missing:
        errors.append(
            f"vocab.concepts: {missing} are neither shipped word lists (honesty, deception) "
            "nor files"
        )
    uri = cfg.storage.uri
    if not (uri.startswith("file://") or uri.startswith("s3://") or uri.startswith("memory://")):
        errors.append(f"storage.uri: expected file://PATH or s3://bucket/prefix, got {uri!r}")
    return errors


def config_from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Validate a plain mapping (parsed YAML) into a `RunConfig`; raise `ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping at the top level, got {type(data).__name__}"])
    errors: list[str] = []
    cfg = build(RunConfig, data, "", errors)
    if errors:
        raise ConfigError(errors)
    errors = _cross_checks(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a config mapping."""
    result = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected key=value, e.g. train.lr=1e-4"])
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError([f"--set {item!r}: malformed key {key!r}"])
        node = result
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError([f"--set {item!r}: {p} is not a section"])
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(
                [f"--set {item!r}: the value is not valid YAML ({exc.problem}); quote it, "
                 f"e.g. {key}='\"...\"'"]
            ) from exc
    return result


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file, apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config: file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"config: {path} is not valid YAML: {exc}"]) from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping at the top level of {path}"])
    return config_from_dict(apply_overrides(data or {}, overrides or []))


def validate_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id) or ".." in run_id:
        raise ConfigError(
            [
                f"run_id: {run_id!r} may only contain letters, digits, '_', '-' and '.', "
                "start with a letter or digit, and be at most 128 characters"
            ]
        )
    return run_id


def field_docs(cls: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """Every field's dotted name and docstring, for docs and `--help`."""
    return _field_docs(cls, prefix)
