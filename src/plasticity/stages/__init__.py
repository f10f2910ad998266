"""The stages of a timeline, one module each: config and URIs in, shards out.

A run goes through them in this order (`flows/timeline.py` drives them):

- `finetune`: train, snapshot checkpoints, write train metrics;
- `extract` (per checkpoint): contrast activations -> one direction per reader and layer;
- `plasticity` (per target checkpoint): every checkpoint's direction, and the nulls,
  steering the target over the alpha sweep;
- `vocab` (per checkpoint, then across them): vocabulary-space readings;
- `intervention` (per branch step, `plasticity.modes: [training]`): the training-time
  protocol;
- `report`: direction similarity, statistics, figures and the summary.

Each stage module is the recipe; the computations it calls live in `train/`,
`steering/`, `vocab/` and `analysis/`, which never import a stage. `common` holds what
the stages share. Each stage writes its Parquet shards under deterministic names and
returns their paths in a `StageResult`; the orchestrator records them in the manifest.
Nothing here knows about Prefect or Ray.
"""

from plasticity.stages.common import (
    StageResult,
    device,
    load_vectors,
    vectors_path,
    written_checkpoints,
)
from plasticity.stages.extract import extract_stage
from plasticity.stages.finetune import finetune_stage
from plasticity.stages.intervention import intervention_stage, intervention_steps
from plasticity.stages.plasticity import NULL_SOURCE_STEP, plasticity_stage
from plasticity.stages.report import report_stage, similarity_stage
from plasticity.stages.vocab import vocab_similarity_stage, vocab_stage

__all__ = [
    "NULL_SOURCE_STEP",
    "StageResult",
    "device",
    "extract_stage",
    "finetune_stage",
    "intervention_stage",
    "intervention_steps",
    "load_vectors",
    "plasticity_stage",
    "report_stage",
    "similarity_stage",
    "vectors_path",
    "vocab_similarity_stage",
    "vocab_stage",
    "written_checkpoints",
]
