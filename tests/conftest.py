"""Fixtures of the core's tests: engines over tiny random models and over the real SmolLM2-135M.

The fixtures every suite shares (``smollm2_dir``, ``tokenizer``, ``passages``, ``tiny_dir``,
``one_torch_thread``) and ``tiny_model`` / ``PASSAGES`` come from the ``cacheblend_rag.testing`` plugin, which
the repository's root conftest.py loads; they are imported here too for the tests that import them from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.testing import PASSAGES, tiny_model  # noqa: F401  (re-exported for the test modules)

SHARED_DATA = Path(os.environ.get("CACHEBLEND_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MESSI = "Lionel Messi scored 13 goals at FIFA World Cups."
RONALDO = "Cristiano Ronaldo scored 8 goals at FIFA World Cups."


def config(strategy: str, **kw) -> BlendConfig:
    return BlendConfig(strategy=strategy, **kw)


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
