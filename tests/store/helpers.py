"""Helpers of the store tests: random blocks, and engines run in separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from cacheblend_rag.store import ChunkKV

REPO = Path(__file__).resolve().parents[2]
FP = "f" * 64


def random_kv(tokens=7, layers=3, heads=2, dim=8, dtype=torch.float16, seed=0) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    return ChunkKV(
        torch.randn(layers, heads, tokens, dim, generator=gen).to(dtype),
        torch.randn(layers, heads, tokens, dim, generator=gen).to(dtype),
    )


ENGINE_PREAMBLE = """
import json, sys, torch
torch.set_num_threads(1)
from transformers import AutoTokenizer
from cacheblend_rag import CacheBlendEngine, BlendConfig
from tests.conftest import tiny_model, PASSAGES
params = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(params["tokenizer"])
engine = CacheBlendEngine(tiny_model("llama", seed=params.get("seed", 0)), tokenizer, store=params["store"],
                          store_dtype=torch.float32, cache_dir=params["cache_dir"])
"""


def run_python(body: str, params: dict, timeout: float = 180) -> dict:
    """Run ``ENGINE_PREAMBLE + body`` in a new interpreter; ``body`` prints one JSON line last, returned here."""
    script = ENGINE_PREAMBLE + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(params)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
