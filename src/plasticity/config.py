"""Run configuration: one dataclass per stage and the `RunConfig` tree.

YAML is parsed into these dataclasses and checked field by field; every error names
the field it is about (``train.lr: expected a positive number, got -1``). The resolved
tree is what goes into the run manifest, so every artefact says how it was made.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SCHEMA_VERSION = 1
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ConfigError(ValueError):
    """A configuration that cannot run. `errors` holds one message per bad field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.errors))


# -- field checks: each returns an error message or None -------------------------------


def _positive(v: Any) -> str | None:
    return None if v is None or v > 0 else f"expected a positive number, got {v!r}"


def _non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else f"expected a number >= 0, got {v!r}"


def _unit_interval(v: Any) -> str | None:
    return None if 0 <= v < 1 else f"expected a number in [0, 1), got {v!r}"


def _non_empty(v: Any) -> str | None:
    return None if v else "expected a non-empty value"


def _non_negative_items(v: Any) -> str | None:
    if v is None:
        return None
    bad = [x for x in v if x < 0]
    return f"expected values >= 0, got {bad}" if bad else None


def _layer_sets(v: Any) -> str | None:
    if v is None:
        return None
    if not v:
        return "expected a non-empty list of layers (or of layer lists)"
    sets = v if isinstance(v[0], list) else [v]
    if any(not s for s in sets):
        return "expected every layer set to be non-empty"
    bad = [x for s in sets for x in s if x < 0]
    return f"expected layers >= 0, got {bad}" if bad else None


def layer_sets(layers: list[int] | list[list[int]] | None) -> list[list[int]] | None:
    """`plasticity.layers` as a list of layer sets (None stays None: the middle layer)."""
    if layers is None:
        return None
    return [list(s) for s in layers] if isinstance(layers[0], list) else [list(layers)]


def _doc(text: str, check=None) -> dict:
    return {"doc": text, "check": check}


# -- stage configs ----------------------------------------------------------------------


@dataclass
class ModelConfig:
    source: str = field(
        default="tiny-gpt2",
        metadata=_doc(
            "An offline preset (tiny-gpt2, tiny-biogpt, tiny-llama, tiny-gpt-neox, "
            "smollm2-135m), a "
            "local model folder, or a hub id (needs network or a filled HF cache).",
            _non_empty,
        ),
    )
    revision: str | None = field(default=None, metadata=_doc("Hub revision for hub ids."))
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata=_doc("Weights dtype when loading.")
    )
    seed: int = field(default=0, metadata=_doc("Seed of the random init of tiny presets."))
    user_tag: str = field(default="", metadata=_doc("Text before the instruction in prompts."))
    assistant_tag: str = field(default="", metadata=_doc("Text before the model's turn."))


@dataclass
class DataConfig:
    corpus: str = field(
        default="pubmed",
        metadata=_doc(
            "Fine-tuning corpus: 'pubmed', 'e2e', or a path to a .parquet, .jsonl, .csv "
            "or .txt file.",
            _non_empty,
        ),
    )
    text_field: str | None = field(
        default=None, metadata=_doc("Column holding the text, for files with several.")
    )
    max_documents: int | None = field(
        default=None, metadata=_doc("Use at most this many documents.", _positive)
    )
    block_size: int = field(
        default=128, metadata=_doc("Tokens per training sequence.", _positive)
    )


@dataclass
class TrainConfig:
    max_steps: int = field(default=20, metadata=_doc("Optimizer steps.", _positive))
    batch_size: int = field(default=4, metadata=_doc("Sequences per step.", _positive))
    lr: float = field(default=5e-5, metadata=_doc("Peak learning rate.", _positive))
    weight_decay: float = field(default=0.0, metadata=_doc("Decoupled weight decay.", _non_negative))
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata=_doc("Adam betas (beta1, beta2).")
    )
    eps: float = field(default=1e-8, metadata=_doc("Adam epsilon.", _positive))
    warmup_steps: int = field(default=0, metadata=_doc("Linear warm-up steps.", _non_negative))
    schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata=_doc("Learning-rate decay after warm-up.")
    )
    optimizer: Literal["adamw4bit", "adamw"] = field(
        default="adamw4bit",
        metadata=_doc(
            "Optimizer: 'adamw4bit' (AdamW with 4-bit moments, plasticity.optim.AdamW4bit) "
            "or 'adamw' (torch.optim.AdamW, fp32 moments)."
        ),
    )
    second_moment: Literal["rank1", "block", "factor"] = field(
        default="rank1",
        metadata=_doc(
            "adamw4bit: how the second moment is stored: 'rank1' (4-bit, scale min(row max, "
            "column max)), 'block' (4-bit, blocks of block_size) or 'factor' (fp32 row and "
            "column statistics, Adafactor-style)."
        ),
    )
    block_size: int = field(
        default=128,
        metadata=_doc("adamw4bit: elements per quantization block (even).", _positive),
    )
    min_quantized_numel: int = field(
        default=4096,
        metadata=_doc(
            "adamw4bit: tensors with at most this many elements keep fp32 moments.",
            _non_negative,
        ),
    )
    grad_clip: float | None = field(
        default=1.0, metadata=_doc("Clip the global gradient norm (None: no clipping).", _positive)
    )
    snapshot_steps: list[int] = field(
        default_factory=lambda: [0, 10, 20],
        metadata=_doc("Steps at which a checkpoint is written; 0 is the base model.", _non_empty),
    )
    log_every: int = field(default=1, metadata=_doc("Train metrics every N steps.", _positive))
    seed: int = field(default=0, metadata=_doc("Seed of data order and dropout."))


@dataclass
class ConceptConfig:
    name: str = field(default="honesty", metadata=_doc("Concept name in the tables.", _non_empty))
    dataset: str = field(
        default="facts_true_false",
        metadata=_doc("Statements (`statement,label` CSV): a shipped name or a path.", _non_empty),
    )
    template: str = field(
        default="{user_tag} Pretend you're {persona} person making statements about the world. "
        "{assistant_tag} {prefix}",
        metadata=_doc("Contrast prompt with {user_tag}, {persona}, {assistant_tag}, {prefix}."),
    )
    positive: str = field(default="an honest", metadata=_doc("Persona of the positive member."))
    negative: str = field(default="an untruthful", metadata=_doc("Persona of the negative member."))
    layers: list[int] | None = field(
        default=None, metadata=_doc("Layers to read (None: every layer).", _non_negative_items)
    )
    max_pairs: int | None = field(
        default=None, metadata=_doc("Contrast pairs in all (None: every pair, as RepE).", _positive)
    )
    n_train: int = field(
        default=512, metadata=_doc("The first pairs, used to fit; the rest test.", _positive)
    )
    methods: list[Literal["pca", "mean_diff", "random"]] = field(
        default_factory=lambda: ["pca", "mean_diff", "random"],
        metadata=_doc(
            "Direction readers, each written per layer: 'pca' (top principal component of "
            "the paired differences), 'mean_diff', 'random' (a unit-norm null).",
            _non_empty,
        ),
    )
    batch_size: int = field(default=16, metadata=_doc("Prompts per forward pass.", _positive))
    seed: int = field(default=0, metadata=_doc("Seed of the pair order and random directions."))


@dataclass
class PlasticityConfig:
    layers: list[int] | list[list[int]] | None = field(
        default=None,
        metadata=_doc(
            "Layers steered together, e.g. [15]; a list of lists ([[12], [15], [12, 15, 18]]) "
            "sweeps each layer set separately (None: the middle layer).",
            _layer_sets,
        ),
    )
    alphas: list[float] = field(
        default_factory=lambda: [-0.5, -0.25, 0.0, 0.25, 0.5],
        metadata=_doc("Steering coefficients; 0 is the unsteered baseline.", _non_empty),
    )
    alpha_scale: Literal["relative", "absolute"] = field(
        default="relative",
        metadata=_doc("'relative': alpha times the target's mean residual norm at the layer."),
    )
    method: Literal["pca", "mean_diff", "random"] = field(
        default="pca", metadata=_doc("Which reader's direction steers (one of concept.methods).")
    )
    operators: list[Literal["add", "piecewise", "ablate", "ablate_add"]] = field(
        default_factory=lambda: ["add"],
        metadata=_doc(
            "Steering operators, each swept: add (h + a*u), piecewise (h + sign(<h,u>)*a*u), "
            "ablate (h - <h,u>*u), ablate_add (h - <h,u>*u + a*u).",
            _non_empty,
        ),
    )
    modes: list[Literal["matrix", "training"]] = field(
        default_factory=lambda: ["matrix"],
        metadata=_doc(
            "'matrix': every checkpoint's direction steers every checkpoint at inference; "
            "'training': the protocol of Kannan (2024) - branch from the snapshot at each "
            "intervention step t, mix the loss of step t+1 with the loss under the steered "
            "last hidden state, L + lambda*(L' - L), train on to the end and score the "
            "final model against the run's own final model. Both may be listed.",
            _non_empty,
        ),
    )
    intervention_steps: list[int] | None = field(
        default=None,
        metadata=_doc(
            "Snapshot steps to branch from in 'training' mode (None: every snapshot before "
            "the last).",
            _non_negative_items,
        ),
    )
    intervention_lambda: float = field(
        default=1.0, metadata=_doc("Weight of the steered loss, L + lambda*(L' - L).", _non_negative)
    )
    intervention_alpha: float = field(
        default=0.25,
        metadata=_doc(
            "Steering coefficient of the intervention, in units of the snapshot's residual "
            "norm at the intervention layer."
        ),
    )
    intervention_layer: int | None = field(
        default=None,
        metadata=_doc(
            "Block whose output (the 'last hidden state' for the last block) is steered in "
            "'training' mode (None: the last block; it must be among concept.layers).",
            _non_negative,
        ),
    )
    null_seeds: int = field(
        default=2,
        metadata=_doc(
            "Random directions swept on every target as a null (same alphas, so the same "
            "norm as the concept direction); 0: none.",
            _non_negative,
        ),
    )
    metrics: list[
        Literal[
            "facts_logit_gap", "facts_accuracy", "facts_true_bias", "truthfulqa_mc1", "truthfulqa_mc2",
            "pubmedqa_accuracy",
        ]
    ] = field(
        default_factory=lambda: ["facts_logit_gap", "facts_accuracy"],
        metadata=_doc(
            "Behaviour scored per alpha; the first drives the report. facts_logit_gap: "
            "log p(' True') - log p(' False') signed by the label; facts_accuracy: its sign; "
            "facts_true_bias: the same log-odds unsigned (how far the model leans to ' True', "
            "which moves with steering even where discrimination does not); "
            "truthfulqa_mc1/mc2: TruthfulQA by answer log-likelihood; pubmedqa_accuracy: "
            "PubMedQA-L test yes/no questions by log p(' yes') vs log p(' no').",
            _non_empty,
        ),
    )
    n_items: int = field(
        default=64, metadata=_doc("Items scored per alpha, per dataset (statements, questions).", _positive)
    )
    batch_size: int = field(default=16, metadata=_doc("Prompts per forward pass.", _positive))
    bootstrap: int = field(default=1000, metadata=_doc("Bootstrap resamples for CIs.", _positive))
    seed: int = field(default=0, metadata=_doc("Seed of item choice and bootstrap."))


@dataclass
class VocabConfig:
    top_k: int = field(default=20, metadata=_doc("Tokens kept per sign and vector.", _positive))
    variants: list[Literal["raw", "lnf"]] = field(
        default_factory=lambda: ["raw", "lnf"],
        metadata=_doc(
            "Projections: 'raw' (E v), 'lnf' (final norm gain times the centred vector). "
            "Models with untied embeddings also get 'raw_in' (the input embedding).",
            _non_empty,
        ),
    )
    layers: list[int] | None = field(
        default=None,
        metadata=_doc(
            "Layers whose weight vectors and OV/QK circuits are read (None: the steered "
            "layers, plasticity.layers, else the middle layer).",
            _non_negative_items,
        ),
    )
    objects: list[Literal["ff_key", "ff_up", "ff_value", "attn_q", "attn_k", "attn_v", "attn_out"]] = field(
        default_factory=lambda: ["ff_key", "ff_up", "ff_value", "attn_q", "attn_k", "attn_v", "attn_out"],
        metadata=_doc(
            "Weight vectors projected per layer of vocab.layers (ff_up only exists in gated "
            "MLPs); each also as its delta against the base checkpoint."
        ),
    )
    vectors_per_object: int = field(
        default=8,
        metadata=_doc(
            "Vectors projected per object and layer: the largest-norm ones in the base "
            "model (deltas: the largest delta norms).",
            _positive,
        ),
    )
    delta_svd: int = field(
        default=1,
        metadata=_doc(
            "Top singular vectors (residual side) of every weight matrix's delta projected, "
            "per layer (0: none).",
            _non_negative,
        ),
    )
    circuits: list[Literal["ov", "qk", "delta_ov", "delta_qk"]] = field(
        default_factory=lambda: ["ov", "qk", "delta_ov", "delta_qk"],
        metadata=_doc("Vocab x vocab circuits whose exact top-k entries are found per head."),
    )
    circuit_heads: list[int] | None = field(
        default=None,
        metadata=_doc("Heads of vocab.layers read as circuits (None: every head).", _non_negative_items),
    )
    circuit_top_k: int = field(
        default=50, metadata=_doc("Circuit entries kept per sign, head and circuit.", _positive)
    )
    circuit_screen: Literal["bfloat16", "float32"] = field(
        default="bfloat16",
        metadata=_doc(
            "Screening product of the exact circuit top-k: 'bfloat16' (fast, with a "
            "rigorous error bound) or 'float32'."
        ),
    )
    concepts: list[str] = field(
        default_factory=lambda: ["honesty", "deception"],
        metadata=_doc("Word lists for concept scores: shipped names or text files.", _non_empty),
    )
    null_samples: int = field(
        default=100,
        metadata=_doc("Random vectors in the null of each concept score.", _positive),
    )
    align_objects: list[Literal["ff_key", "ff_value"]] = field(
        default_factory=lambda: ["ff_key", "ff_value"],
        metadata=_doc("Parameter kinds aligned between checkpoints in vocabulary space."),
    )
    align_vectors: int = field(
        default=64,
        metadata=_doc(
            "Vectors per layer in the alignment (largest norm in the base model).", _positive
        ),
    )
    seed: int = field(default=0, metadata=_doc("Seed of the null vectors."))


@dataclass
class StorageConfig:
    uri: str = field(
        default="file://./runs",
        metadata=_doc("Storage root: file://PATH or s3://bucket/prefix.", _non_empty),
    )
    endpoint_url: str | None = field(
        default=None, metadata=_doc("S3-compatible endpoint (MinIO, a local S3 server).")
    )
    region: str | None = field(default=None, metadata=_doc("S3 region."))
    lock_stale_s: float = field(
        default=600.0,
        metadata=_doc(
            "A run's lock whose heartbeat is older than this many seconds is stale (its "
            "owner crashed) and is taken over; the owner refreshes it every tenth of that.",
            _positive,
        ),
    )


@dataclass
class ComputeConfig:
    ray_address: str | None = field(
        default=None, metadata=_doc("Ray cluster address (else RAY_ADDRESS, else local).")
    )
    num_workers: int | None = field(
        default=None, metadata=_doc("Evaluation actors (None: one per GPU, or per CPU).", _positive)
    )
    cpus_per_worker: float = field(default=1.0, metadata=_doc("CPUs per actor.", _positive))
    eval_gpus: float = field(
        default=1.0,
        metadata=_doc(
            "GPU share of an evaluation actor on GPU clusters (0: evaluation on CPUs).",
            _non_negative,
        ),
    )
    train_cpus: float | None = field(
        default=None,
        metadata=_doc(
            "CPUs of the fine-tuning actor (None: every CPU of a one-node CPU cluster, "
            "else cpus_per_worker).",
            _positive,
        ),
    )
    train_gpus: float = field(
        default=1.0, metadata=_doc("GPUs of the fine-tuning actor on GPU clusters.", _positive)
    )
    gpu_resource: str = field(
        default="GPU",
        metadata=_doc(
            "The Ray resource that train_gpus and eval_gpus request when the cluster has it: "
            "GPU, or a custom resource that marks accelerator nodes.",
            _non_empty,
        ),
    )
    actor_restarts: int = field(
        default=2,
        metadata=_doc(
            "How often Ray restarts a stage actor that died (its node lost) and retries the "
            "call it was running; bounded, then the stage fails.",
            _non_negative,
        ),
    )
    working_dir: str | None = field(
        default=None,
        metadata=_doc(
            "Folder shipped to a remote Ray cluster as the runtime_env working_dir (None: "
            "the cluster's image has the project installed). Never for local Ray.",
        ),
    )


@dataclass
class RunConfig:
    name: str = field(default="run", metadata=_doc("A label for the run.", _non_empty))
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


# -- parsing ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_type_name(item)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the value in canonical form."""
    origin = typing.get_origin(tp)
    bad = object()
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            sub: list[str] = []
            out = _coerce(value, arg, path, sub)
            if not sub:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return bad
        return [_coerce(v, item, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return bad
        return _build(tp, value, path, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "2e-4" (no dot) as a string; take it as the number it spells.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return bad


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            known = ", ".join(sorted(fields))
            errors.append(f"{where}: unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = f"{prefix}.{name}" if prefix else name
        n_before = len(errors)
        value = _coerce(data[name], hints[name], path, errors)
        if len(errors) > n_before:
            continue
        check = f.metadata.get("check")
        if check is not None:
            # Report the value as written (-1, not -1.0).
            raw = data[name]
            msg = check(raw if isinstance(value, float) and isinstance(raw, int) else value)
            if msg:
                errors.append(f"{path}: {msg}")
                continue
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defaults cover every field
        errors.append(f"{prefix or 'config'}: {exc}")
        return None
    return obj


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
    cfg = _build(RunConfig, data, "", errors)
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
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_docs(hints[f.name], name + "."))
        else:
            out[name] = f.metadata.get("doc", "")
    return out
