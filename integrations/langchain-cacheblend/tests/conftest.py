"""Fixtures: engines over tiny random models with the SmolLM2 tokenizer.

``tokenizer``, ``smollm2_dir``, ``passages`` and ``one_torch_thread`` come from the cacheblend_rag.testing plugin
(loaded by the repository's root conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from cacheblend_rag import CacheBlendEngine
from cacheblend_rag.testing import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer random Llama with the SmolLM2 vocabulary (float32)."""
    return tiny_model("llama", seed=seed, layers=2)


@pytest.fixture(scope="session")
def tiny_engine(tokenizer, tmp_path_factory) -> CacheBlendEngine:
    """An engine over a tiny random model: fast, deterministic, its text is gibberish."""
    engine = CacheBlendEngine(
        tiny_llama(), tokenizer, store=["memory://"], cache_dir=tmp_path_factory.mktemp("tiny-kv")
    )
    engine.name = "tiny-random-llama"
    return engine


@pytest.fixture
def make_tiny_engine(tokenizer, tmp_path):
    """Build a fresh engine (or an engine subclass) over the tiny model with its own store."""

    def build(cls: type[CacheBlendEngine] = CacheBlendEngine, **kwargs) -> CacheBlendEngine:
        return cls(tiny_llama(), tokenizer, store=["memory://"], cache_dir=tmp_path, **kwargs)

    return build


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """These tests run their models on one torch thread; restored after each module, so tests of other packages
    in the same run are not affected (cacheblend_rag.testing.one_torch_thread)."""
