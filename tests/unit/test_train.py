import json

import pytest
import torch

from plasticity.config import ModelConfig, StorageConfig, TrainConfig
from plasticity.models import load_model
from plasticity.storage import Storage
from plasticity.train import finetune, load_checkpoint, lr_at, pack_corpus, save_checkpoint
from plasticity.train.checkpoint import CorruptCheckpointError
from plasticity.train.loop import build_optimizer


def test_pack_corpus_joins_with_eos_and_cuts_full_blocks(tiny_gpt2):
    blocks = pack_corpus(["hello world", "foo bar baz"], tiny_gpt2.tokenizer, 3)
    stream = (
        tiny_gpt2.tokenizer("hello world")["input_ids"] + [50256]
        + tiny_gpt2.tokenizer("foo bar baz")["input_ids"] + [50256]
    )
    assert blocks.shape == (len(stream) // 3, 3)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_corpus(["hi"], tiny_gpt2.tokenizer, 100)


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, max_steps=10, warmup_steps=2, schedule="cosine", snapshot_steps=[0])
    assert [lr_at(s, cfg) for s in (1, 2)] == [0.5, 1.0]
    assert lr_at(10, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(6, cfg) == pytest.approx(0.5)
    lin = TrainConfig(lr=1.0, max_steps=10, schedule="linear", snapshot_steps=[0])
    assert lr_at(5, lin) == pytest.approx(0.5)


def test_finetune_learns_and_snapshots_at_the_configured_steps():
    lm = load_model(ModelConfig(source="tiny-gpt2"))
    blocks = pack_corpus(["the cat sat on the mat"] * 40, lm.tokenizer, 16)
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=3e-3, snapshot_steps=[0, 6, 12], log_every=1)
    records, snaps = [], []
    finetune(lm.model, blocks, cfg, build_optimizer(lm.model, cfg), records.append,
             lambda state: snaps.append(state.step))
    assert snaps == [0, 6, 12]
    assert [r.step for r in records] == list(range(1, 13))
    assert records[-1].loss < records[0].loss - 1.0
    assert records[-1].tokens_seen == 12 * 4 * 16


def test_nan_loss_stops_training():
    lm = load_model(ModelConfig(source="tiny-gpt2"))
    with torch.no_grad():
        lm.model.transformer.wte.weight.fill_(float("nan"))
    blocks = pack_corpus(["the cat sat on the mat"] * 10, lm.tokenizer, 8)
    cfg = TrainConfig(max_steps=3, snapshot_steps=[0])
    with pytest.raises(FloatingPointError, match="training loss is nan at step 1"):
        finetune(lm.model, blocks, cfg, build_optimizer(lm.model, cfg), lambda r: None, lambda s: None)


def test_checkpoint_round_trip_and_corruption(tmp_path, tiny_gpt2):
    storage = Storage.from_config(StorageConfig(uri=f"file://{tmp_path}"))
    cfg = TrainConfig(snapshot_steps=[0])
    opt = build_optimizer(tiny_gpt2.model, cfg)
    ref = save_checkpoint(storage, "r1", 7, tiny_gpt2.model, tiny_gpt2.tokenizer, opt, {"k": 1})
    folder = tmp_path / "runs/r1/checkpoints/step=000007"
    assert ref.path == str(folder)
    names = sorted(p.name for p in folder.iterdir())
    for needed in ("SHA256SUMS", "config.json", "model.safetensors", "optimizer.safetensors", "plasticity_config.json"):
        assert needed in names
    assert json.loads((folder / "plasticity_config.json").read_text())["config"] == {"k": 1}
    lm = load_checkpoint(storage, ref.path, ModelConfig())
    ids = torch.tensor([[464, 3797, 3332, 319]])
    torch.testing.assert_close(lm.model(ids).logits, tiny_gpt2.model(ids).logits, rtol=0, atol=0)
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors does not match SHA256SUMS"):
        load_checkpoint(storage, ref.path, ModelConfig())
