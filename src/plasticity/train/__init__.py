"""The fine-tuning loop and checkpoint snapshots (pure; I/O through callbacks and Storage)."""

from plasticity.train.checkpoint import CheckpointRef, load_checkpoint, save_checkpoint
from plasticity.train.loop import TrainRecord, finetune, lr_at, pack_corpus

__all__ = [
    "CheckpointRef",
    "load_checkpoint",
    "save_checkpoint",
    "TrainRecord",
    "finetune",
    "lr_at",
    "pack_corpus",
]
