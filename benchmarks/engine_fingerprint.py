"""A fingerprint of what the engine computes: every strategy and selection on fixed requests, bit for bit.

Runs a fixed set of requests (chunk handles in chat segments, a prompt string and chat messages that hold
registered chunks, a chunk the placement rules refuse, a registry scope) on a tiny random-weight Llama and on
SmolLM2-135M (float32 on the CPU), under every strategy and cacheblend selection (full_recompute; prefix_cache
twice, storing then hitting; full_reuse; cacheblend with the query, deviation and attention selections, a fidelity
target, several check layers, forced chunk heads, recompute_ratio 1.0), and on the tiny model also from a disk-only
store (chunks arrive layer by layer) and from a disk file corrupted mid-way (its read fails inside the prefill).
Per request it records the greedy tokens and text, the first-token logits (sha256 of their float32 bytes and
their largest magnitude) and every RequestStats field but the timings; then the engine's counters.

    python benchmarks/engine_fingerprint.py --record results/fingerprint_before.json
    python benchmarks/engine_fingerprint.py --compare results/fingerprint_before.json   # exit 1 on any difference

Uses the package's public API only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from cacheblend_rag import BlendConfig, CacheBlendEngine
from cacheblend_rag.store import DiskTier
from cacheblend_rag.testing import PASSAGES, flip_tensor, tiny_model

TIMINGS = {"load_s", "probe_s", "prefill_s", "ttft_s", "decode_s"}
MAX_NEW_TOKENS = 8
SCOPE = "fingerprint-scope"

# (name, strategy, options, runs): only the options the strategy and selection read
CONFIGS = [
    ("full_recompute", "full_recompute", {}, 1),
    ("prefix_cache", "prefix_cache", {}, 2),
    ("full_reuse", "full_reuse", {}, 1),
    ("full_reuse-head2", "full_reuse", {"recompute_chunk_head": 2}, 1),
    ("query", "cacheblend", {"selection": "query"}, 1),
    ("query-ratio1", "cacheblend", {"selection": "query", "recompute_ratio": 1.0}, 1),
    ("query-ratio0", "cacheblend", {"selection": "query", "recompute_ratio": 0.0}, 1),
    ("query-fidelity", "cacheblend", {"selection": "query", "fidelity_target": 0.8, "max_ratio": 0.6}, 1),
    ("query-head3", "cacheblend", {"selection": "query", "recompute_chunk_head": 3}, 1),
    ("deviation", "cacheblend", {"selection": "deviation"}, 1),
    ("deviation-k", "cacheblend", {"selection": "deviation", "deviation": "k", "recompute_ratio": 0.3}, 1),
    ("deviation-ratio1", "cacheblend", {"selection": "deviation", "recompute_ratio": 1.0}, 1),
    ("deviation-fidelity", "cacheblend", {"selection": "deviation", "fidelity_target": 0.7, "min_ratio": 0.05}, 1),
    ("deviation-layers", "cacheblend", {"selection": "deviation", "check_layers": (1, 3)}, 1),
    (
        "deviation-ratios",
        "cacheblend",
        {"selection": "deviation", "check_layers": (1, 2, 3), "check_ratios": (0.6, 0.4, 0.15)},
        1,
    ),
    ("deviation-head2", "cacheblend", {"selection": "deviation", "recompute_chunk_head": 2}, 1),
    ("attention", "cacheblend", {"selection": "attention"}, 1),
    ("attention-layers", "cacheblend", {"selection": "attention", "check_layers": (2, 3), "deviation": "k"}, 1),
    ("attention-fidelity", "cacheblend", {"selection": "attention", "fidelity_target": 0.9}, 1),
]
# the configs run from a disk-only store, and from a file corrupted mid-way
LAZY_CONFIGS = ("full_reuse", "query", "deviation", "attention-layers", "query-fidelity")


def requests(engine: CacheBlendEngine, handles, scoped) -> list[tuple[str, dict]]:
    """(name, keyword arguments of generate) of the fixed requests."""
    p = PASSAGES
    question = "\nWhich river carries the most water? Answer in one sentence."
    chat = engine.chat_segments(
        ["Read these passages.\n", handles[0], "\n\n", handles[1], "\n\n", handles[2], question]
    )
    prompt = f"Passages:\n{p[0]}\n\n{p[2]}\n\nQuestion: which mountain is the highest in Africa?\nAnswer:"
    messages = [
        {"role": "system", "content": "You answer from the passages only."},
        {"role": "user", "content": f"{p[1]}\n\nHow many countries does the Danube pass through?"},
    ]
    return [
        ("segments", {"segments": chat}),
        ("prompt", {"prompt": prompt}),
        ("messages", {"messages": messages}),
        ("unplaced", {"segments": ["Context: ", handles[1]]}),
        ("scoped", {"segments": ["Notes:\n", scoped[0], "\n", scoped[1], question], "scope": SCOPE}),
    ]


def logits_digest(logits: torch.Tensor) -> dict:
    """sha256 of the logits' float32 bytes and their largest magnitude."""
    data = logits.detach().float().cpu().contiguous()
    return {"sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(), "max_abs": float(data.abs().max())}


def stats_dict(stats) -> dict:
    return {k: v for k, v in stats.as_dict().items() if k not in TIMINGS}


def run_request(engine: CacheBlendEngine, kwargs: dict, config: BlendConfig) -> dict:
    """One prepare (the first-token logits and the prefill's stats) and one generate (tokens, text, stats)."""
    prepared = engine.prepare(config=config, **kwargs)
    out = {"logits": logits_digest(prepared.logits), "prepare_stats": stats_dict(prepared.stats)}
    result = engine.generate(config=config, max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    out.update(tokens=list(result.token_ids), text=result.text, finish=result.finish_reason)
    out["stats"] = stats_dict(result.stats)
    return out


def corrupt_midway(engine: CacheBlendEngine, key: str) -> None:
    """Flip a byte of layer 2's values in ``key``'s disk file: its read fails inside the prefill."""
    disk = next(t for t in engine.store.tiers if isinstance(t, DiskTier))
    flip_tensor(disk, key, "v.2")


def counters(engine: CacheBlendEngine) -> dict:
    return {k: v for k, v in engine.metrics().items() if k != "store"}


def run_engine(engine: CacheBlendEngine, configs, corrupt: bool = False) -> dict:
    """Every config of ``configs`` on every request (precomputing the chunks first)."""
    handles = engine.precompute(PASSAGES, context=0)
    scoped = engine.precompute(PASSAGES[:2], scope=SCOPE, context=0)
    out: dict = {}
    for name, strategy, options, runs in configs:
        # the blended path itself, however short the prompt (the cost model would compute these prompts in full)
        blend = {"exact_when_faster": False} if strategy == "cacheblend" else {}
        config = BlendConfig(strategy=strategy, **blend, **options)
        for req_name, kwargs in requests(engine, handles, scoped):
            for run in range(runs):
                if corrupt:
                    corrupt_midway(engine, handles[1].key)
                key = f"{req_name}/{name}" + (f"/run{run + 1}" if runs > 1 else "")
                out[key] = run_request(engine, kwargs, config)
    out["counters"] = counters(engine)
    return out


def build_engines(root: Path, only_tiny: bool):
    """(name, engine factory, configs, corrupt) for every engine the fingerprint runs."""
    by_name = {c[0]: c for c in CONFIGS}
    lazy = [by_name[n] for n in LAZY_CONFIGS]
    smol = CacheBlendEngine.from_pretrained(
        "smollm2-135m", device="cpu", dtype="float32", store=["memory://?max_bytes=2GB", f"file://{root / 'smol-kv'}"]
    )
    tokenizer = smol.tokenizer

    def tiny(store: list[str]) -> CacheBlendEngine:
        return CacheBlendEngine(tiny_model("llama", seed=3), tokenizer, store=store, cache_dir=root)

    out = [
        ("tiny", lambda: tiny(["memory://?max_bytes=1GB", f"file://{root / 'tiny-kv'}"]), CONFIGS, False),
        ("tiny-disk", lambda: tiny([f"file://{root / 'tiny-disk'}"]), lazy, False),
        ("tiny-corrupt", lambda: tiny([f"file://{root / 'tiny-corrupt'}"]), lazy, True),
    ]
    if not only_tiny:
        out.append(("smollm2-135m", lambda: smol, CONFIGS, False))
    return out


def fingerprint(only_tiny: bool = False) -> dict:
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory(prefix="cacheblend-fingerprint-") as tmp:
        for name, factory, configs, corrupt in build_engines(Path(tmp), only_tiny):
            out[name] = run_engine(factory(), configs, corrupt)
            print(f"{name}: {len(out[name]) - 1} requests", flush=True)
    return out


def differences(want, got, path: str = "") -> list[str]:
    """Every place where ``got`` differs from ``want`` (nested dicts and lists), as readable lines."""
    if isinstance(want, dict) and isinstance(got, dict):
        lines = []
        for key in sorted(set(want) | set(got), key=str):
            where = f"{path}/{key}" if path else str(key)
            if key not in got:
                lines.append(f"{where}: missing (recorded {want[key]!r})")
            elif key not in want:
                lines.append(f"{where}: new (not recorded) {got[key]!r}")
            else:
                lines += differences(want[key], got[key], where)
        return lines
    if want != got:
        return [f"{path}: recorded {want!r}, now {got!r}"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the fingerprint to this JSON file")
    mode.add_argument("--compare", type=Path, help="compare with a recorded JSON file; exit 1 on any difference")
    parser.add_argument("--tiny-only", action="store_true", help="skip SmolLM2-135M (a quick check)")
    args = parser.parse_args(argv)
    # through JSON, so tuples and floats compare as they were recorded
    got = json.loads(json.dumps(fingerprint(args.tiny_only)))
    if args.record is not None:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(len(v) - 1 for v in got.values())} requests to {args.record}")
        return 0
    want = json.loads(args.compare.read_text())
    if args.tiny_only:
        want = {k: v for k, v in want.items() if k in got}
    diff = differences(want, got)
    n = sum(len(v) - 1 for v in got.values())
    if diff:
        print(f"{len(diff)} differences from {args.compare}:")
        print("\n".join(diff))
        return 1
    print(f"identical: {n} requests match {args.compare} bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
