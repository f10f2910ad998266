"""Causal-LM fine-tuning as a plain function: batches in, callbacks out."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plasticity.config import TrainConfig
from plasticity.models.tokens import special_prefix

log = logging.getLogger(__name__)


@dataclass
class TrainRecord:
    step: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens_seen: int
    step_time_s: float


def pack_corpus(docs: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenize documents (each after the tokenizer's special prefix, e.g. Gemma's BOS),
    join them with EOS and cut the stream into full blocks."""
    eos = tokenizer.eos_token_id
    prefix = special_prefix(tokenizer)
    stream: list[int] = []
    for doc in docs:
        stream += prefix + tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream.append(eos)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}"
        )
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (1-based)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.optimizer`: 'adamw4bit' (4-bit moments) or 'adamw'."""
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.optimizer == "adamw4bit":
        from plasticity.optim import AdamW4bit

        return AdamW4bit(
            model.parameters(),
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            second_moment=cfg.second_moment,
            block_size=cfg.block_size,
            min_quantized_numel=cfg.min_quantized_numel,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's per-parameter state tensors occupy (codes, scales, moments)."""
    from plasticity.optim import optimizer_state_bytes as count

    return count(optimizer)


@dataclass
class TrainState:
    """Everything besides weights and optimizer state that a resumed run needs to continue
    exactly where it stopped: the step, the data position and the random generators."""

    step: int
    epoch: int
    cursor: int
    tokens_seen: int
    order: torch.Tensor  # the current epoch's permutation of blocks
    data_rng: torch.Tensor  # state of the generator that draws permutations
    torch_rng: torch.Tensor  # global CPU RNG (dropout)


def finetune(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    on_record: Callable[[TrainRecord], None],
    on_snapshot: Callable[[TrainState], None],
    device: torch.device | str = "cpu",
    resume: TrainState | None = None,
    mix_loss: Callable[[int, torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Train up to `cfg.max_steps`; call `on_snapshot(state)` at each snapshot step.

    `mix_loss(step, model, batch, loss)`, if given, returns the loss to backpropagate at
    each step (the training-time intervention mixes in a steered loss there).

    Batches are drawn from a seeded permutation of `blocks`, epoch after epoch, so a run
    is reproducible from its config alone. With `resume` (and the model and optimizer
    restored from the same snapshot) training continues bit for bit as if uninterrupted.
    """
    device = torch.device(device)
    snapshots = set(cfg.snapshot_steps)
    gen = torch.Generator()
    if resume is None:
        gen.manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        order = torch.randperm(len(blocks), generator=gen)
        cursor = epoch = tokens_seen = start = 0
    else:
        gen.set_state(resume.data_rng)
        torch.set_rng_state(resume.torch_rng)
        order, cursor, epoch = resume.order.clone(), resume.cursor, resume.epoch
        tokens_seen, start = resume.tokens_seen, resume.step

    def state(step: int) -> TrainState:
        return TrainState(
            step, epoch, cursor, tokens_seen, order.clone(), gen.get_state(), torch.get_rng_state()
        )

    if resume is None and 0 in snapshots:
        on_snapshot(state(0))
    autocast = device.type == "cuda"
    model.train()
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        idx = []
        while len(idx) < cfg.batch_size:
            if cursor == len(order):
                order = torch.randperm(len(blocks), generator=gen)
                cursor = 0
                epoch += 1
            take = min(cfg.batch_size - len(idx), len(order) - cursor)
            idx += order[cursor : cursor + take].tolist()
            cursor += take
        batch = blocks[idx].to(device)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=batch, labels=batch)
        loss = out.loss
        if mix_loss is not None:
            loss = mix_loss(step, model, batch, loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {step}; stopping "
                f"(the last good snapshot is kept)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
            )
        try:
            optimizer.step()
        except FloatingPointError as exc:  # AdamW4bit: a non-finite gradient, nothing changed
            raise FloatingPointError(
                f"step {step}: {exc}; stopping (the last good snapshot is kept)"
            ) from exc
        tokens_seen += batch.numel()
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            on_record(
                TrainRecord(
                    step=step,
                    epoch=epoch + cursor / len(order),
                    loss=float(loss.item()),
                    lr=lr,
                    grad_norm=float(grad_norm),
                    tokens_seen=tokens_seen,
                    step_time_s=time.perf_counter() - t0,
                )
            )
        if step in snapshots:
            model.eval()
            on_snapshot(state(step))
            model.train()
    model.eval()
