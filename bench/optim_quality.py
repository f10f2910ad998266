"""Fine-tuning quality of AdamW4bit against fp32 AdamW on a real model, same seed and batches.

SmolLM2-135M (the offline preset) fine-tuned on PubMed abstracts (or E2E-NLG) for a short run;
each optimizer starts from the same weights and sees the same batches; the final held-out
loss (documents never trained on) is compared with fp32 AdamW's. Also the paper's stability
ablation: the second moment quantized block-wise with a 4-bit map that includes zero
(linear, i / 15), where small second moments round to 0 and their updates blow up, against
the zero-free map. `rank1-bf16-scales` (not in the default list) is `rank1` with its block
scales stored in bfloat16.

    python -m bench.optim_quality                       # pubmed, 40 steps of 4 x 64 tokens
    python -m bench.optim_quality --corpus e2e --steps 100 --lr 3e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time

import torch

from plasticity.config import ModelConfig, TrainConfig
from plasticity.data.corpus import load_corpus
from plasticity.models import load_model
from plasticity.optim import AdamW4bit, optimizer_state_bytes
from plasticity.train.loop import build_optimizer, finetune, pack_corpus


class ZeroMapAdamW4bit(AdamW4bit):
    """Ablation: the second moment's map includes zero (linear, code / 15)."""

    v_map = torch.arange(16, dtype=torch.float32) / 15

    @staticmethod
    def v_quantize(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 15).clamp_(0, 15).long()


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        b = blocks[i : i + batch]
        out = model(input_ids=b, labels=b)
        n = b.numel() - len(b)  # predicted tokens
        total += float(out.loss) * n
        count += n
    return total / count


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="pubmed", choices=["pubmed", "e2e"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--heldout-blocks", type=int, default=48)
    ap.add_argument("--variants", nargs="*",
                    default=["adamw", "rank1", "block", "factor", "block-zero-map"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    lm = load_model(ModelConfig(source="smollm2-135m", dtype="float32"))
    docs = load_corpus(args.corpus)
    n_held = max(1, len(docs) // 10)
    train_blocks = pack_corpus(docs[:-n_held], lm.tokenizer, args.block_size)
    held_blocks = pack_corpus(docs[-n_held:], lm.tokenizer, args.block_size)[: args.heldout_blocks]
    base_state = copy.deepcopy(lm.model.state_dict())
    base_loss = heldout_loss(lm.model, held_blocks)
    print(f"SmolLM2-135M on {args.corpus}: {len(train_blocks)} train blocks, {len(held_blocks)} "
          f"held-out blocks of {args.block_size} tokens; held-out loss before: {base_loss:.4f}")

    results = []
    for variant in args.variants:
        lm.model.load_state_dict(base_state)
        cfg = TrainConfig(
            max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=0.01,
            warmup_steps=max(1, args.steps // 10), schedule="linear", snapshot_steps=[0],
            optimizer="adamw" if variant == "adamw" else "adamw4bit",
            second_moment=variant if variant in ("rank1", "block", "factor") else "block",
        )
        if variant == "block-zero-map":
            opt = ZeroMapAdamW4bit(lm.model.parameters(), lr=args.lr, weight_decay=0.01,
                                   second_moment="block", nonfinite="skip")
        elif variant == "rank1-bf16-scales":
            opt = AdamW4bit(lm.model.parameters(), lr=args.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            weight_decay=0.01, second_moment="rank1", block_size=cfg.block_size,
                            min_quantized_numel=cfg.min_quantized_numel, scale_dtype="bfloat16")
        else:
            opt = build_optimizer(lm.model, cfg)
        records = []
        t0 = time.perf_counter()
        status = "ok"
        def on_record(r, records=records, variant=variant):
            records.append(r)
            if r.step % 10 == 0:
                print(f"    {variant}: step {r.step}/{args.steps}, loss {r.loss:.4f}, "
                      f"{r.step_time_s:.1f} s/step", flush=True)

        try:
            finetune(lm.model, train_blocks, cfg, opt, on_record, lambda s: None)
        except FloatingPointError as exc:
            status = f"stopped: {str(exc)[:80]}"
        wall = time.perf_counter() - t0
        loss = heldout_loss(lm.model, held_blocks) if status == "ok" else math.nan
        if not math.isfinite(loss):
            status = "diverged" if status == "ok" else status
        row = {
            "variant": variant, "heldout_loss": loss, "status": status,
            "train_loss_last10": sum(r.loss for r in records[-10:]) / max(1, len(records[-10:])),
            "max_train_loss": max((r.loss for r in records), default=math.nan),
            "state_bytes": optimizer_state_bytes(opt), "wall_s": wall,
            "skipped_steps": getattr(opt, "skipped_steps", 0),
        }
        results.append(row)
        print(f"  {variant:<15} held-out {loss:.4f}  train(last 10) {row['train_loss_last10']:.4f}  "
              f"max train {row['max_train_loss']:.3f}  {wall:.0f} s  {status}", flush=True)

    ref = next((r["heldout_loss"] for r in results if r["variant"] == "adamw"), None)
    print(f"\n{'variant':<16} {'held-out loss':>13} {'vs fp32 AdamW':>14} {'state MB':>9} {'status':>8}")
    for r in results:
        rel = (r["heldout_loss"] / ref - 1) * 100 if ref else math.nan
        print(f"{r['variant']:<16} {r['heldout_loss']:>13.4f} {rel:>+13.2f}% "
              f"{r['state_bytes'] / 1e6:>9.1f} {r['status']:>8}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "base_loss": base_loss, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
