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


def test_build_optimizer_default_is_adamw4bit_and_both_learn():
    from plasticity.optim import AdamW4bit

    assert TrainConfig().optimizer == "adamw4bit"
    for name, cls in (("adamw4bit", AdamW4bit), ("adamw", torch.optim.AdamW)):
        lm = load_model(ModelConfig(source="tiny-gpt2"))
        blocks = pack_corpus(["the cat sat on the mat"] * 40, lm.tokenizer, 16)
        cfg = TrainConfig(max_steps=8, lr=3e-3, snapshot_steps=[0], optimizer=name)
        opt = build_optimizer(lm.model, cfg)
        assert type(opt) is cls
        records = []
        finetune(lm.model, blocks, cfg, opt, records.append, lambda s: None)
        assert records[-1].loss < records[0].loss - 1.0, name


def test_a_non_finite_gradient_stops_training_and_changes_nothing():
    lm = load_model(ModelConfig(source="tiny-gpt2"))
    blocks = pack_corpus(["the cat sat on the mat"] * 10, lm.tokenizer, 8)
    cfg = TrainConfig(max_steps=3, snapshot_steps=[0], grad_clip=None)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lm.model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * float("inf"))
    opt = build_optimizer(lm.model, cfg)
    with pytest.raises(FloatingPointError, match="step 1: AdamW4bit: non-finite gradient"):
        finetune(lm.model, blocks, cfg, opt, lambda r: None, lambda s: None)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not s for s in opt.state.values())


@pytest.mark.parametrize("optimizer", ["adamw4bit", "adamw"])
def test_resume_from_a_snapshot_is_bit_identical(tmp_path, optimizer):
    """Weights, optimizer state (through safetensors) and TrainState from step 3 of 6."""
    from plasticity.train.checkpoint import (
        optimizer_from_safetensors,
        optimizer_to_safetensors,
        train_state_from_safetensors,
        train_state_to_safetensors,
    )

    cfg = TrainConfig(max_steps=6, lr=3e-3, snapshot_steps=[3], optimizer=optimizer)
    lm = load_model(ModelConfig(source="tiny-gpt2"))
    blocks = pack_corpus(["the cat sat on the mat, the dog sat on the log"] * 30, lm.tokenizer, 16)
    opt = build_optimizer(lm.model, cfg)
    saved = {}

    def snap(state):
        saved["weights"] = {k: v.clone() for k, v in lm.model.state_dict().items()}
        optimizer_to_safetensors(opt, tmp_path / "optimizer.safetensors")
        train_state_to_safetensors(state, tmp_path / "trainer_state.safetensors")

    finetune(lm.model, blocks, cfg, opt, lambda r: None, snap)
    want = {k: v.clone() for k, v in lm.model.state_dict().items()}

    lm2 = load_model(ModelConfig(source="tiny-gpt2"))
    lm2.model.load_state_dict(saved["weights"])
    opt2 = build_optimizer(lm2.model, cfg)
    optimizer_from_safetensors(opt2, tmp_path / "optimizer.safetensors")
    resume = train_state_from_safetensors(tmp_path / "trainer_state.safetensors")
    assert resume.step == 3
    finetune(lm2.model, blocks, cfg, opt2, lambda r: None, lambda s: None, resume=resume)
    for k, v in lm2.model.state_dict().items():
        assert torch.equal(v, want[k]), k
