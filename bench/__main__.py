"""`make bench`: run every benchmark and print its ratios."""

from bench import (
    hooks,
    log_forwarding,
    optim,
    optim_host,
    study,
    sweep,
    vocab_circuits,
    vocab_similarity,
)

if __name__ == "__main__":
    hooks.main()
    sweep.main()
    vocab_circuits.main([])
    # The across-checkpoint vocab comparison at Gemma 3 270M's vocabulary, before / after
    # (3 checkpoints, about 2 minutes, up to 9 GB).
    vocab_similarity.main([])
    # AdamW4bit vs fused fp32 AdamW step (the fine-tuning quality bench, bench.optim_quality,
    # takes about a quarter of an hour and runs on its own).
    optim.main([])
    optim_host.main([])
    # A study's runs at once against one after another (two smoke runs, about 4 minutes).
    study.main([])
    # The smoke timeline with compute.forward_logs on against off (2 runs each, about 4 minutes).
    log_forwarding.main([])
    # (bench.optim_ab compares builds of the C++ kernel; it takes their sources as arguments.)
