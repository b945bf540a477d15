"""``gpu_check.py --profile``: where one request's time goes, per strategy and store tier.

For one ``engine.prepare`` (after a warm-up run of the same request) under ``torch.profiler``: the wall time,
the GPU-busy time (the union of kernel, memcpy and memset intervals on the device), the host synchronisations
(``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, synchronous ``cudaMemcpy``, and
``aten::_local_scalar_dense``: every ``.item()``/``int(tensor)``), ``aten::nonzero`` calls, and the host-to-device
copies (count and bytes, pageable ones apart). On the CPU (``--smoke``) only the host-side counts mean anything.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

SYNC_CALLS = {
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cuStreamSynchronize",
    "cuCtxSynchronize",
}


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e3  # trace times are in microseconds


def profile_call(fn, device: torch.device) -> dict:
    """Profile one call of ``fn`` (already warmed up): wall_ms, gpu_busy_ms, host_syncs, items, nonzero,
    h2d_copies, h2d_MB, h2d_pageable_MB."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        fn()
        sync()
        wall = 1e3 * (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e for e in json.loads(path.read_text()).get("traceEvents", []) if e.get("ph") == "X"]
    busy = [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    h2d = [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    h2d_bytes = [float((e.get("args") or {}).get("bytes", 0)) for e in h2d]
    pageable = sum(b for e, b in zip(h2d, h2d_bytes) if "Pageable" in e.get("name", ""))
    names = [e.get("name", "") for e in events]
    runtime_syncs = sum(
        1 for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("name") in SYNC_CALLS
    )
    items = names.count("aten::_local_scalar_dense")
    return {
        "wall_ms": wall,
        "gpu_busy_ms": _union_ms(busy) if device.type == "cuda" else None,
        "host_syncs": runtime_syncs if device.type == "cuda" else items,
        "items": items,
        "nonzero": names.count("aten::nonzero"),
        "h2d_copies": len(h2d),
        "h2d_MB": sum(h2d_bytes) / 1e6,
        "h2d_pageable_MB": pageable / 1e6,
    }


def profile_section(add, engine, segments, device, ratio: float) -> None:
    """One ``profile`` row per (strategy, store tier). Tiers: the device tier (a hit copies nothing across PCIe),
    the pinned host tier alone (layer-by-layer side-stream copies), as the engine's store has them."""
    from cacheblend_rag import BlendConfig

    tiers = list(engine.store.tiers)
    variants = {"store": tiers}
    for tier in tiers:
        if tier.name in ("device", "pinned"):
            variants[tier.name] = [tier]
    shape = f"{len(segments) - 2} chunks"
    try:
        for label, chosen in variants.items():
            engine.store.tiers = chosen
            for strategy in ("full_recompute", "full_reuse", "cacheblend"):
                cfg = BlendConfig(strategy=strategy, backend="triton", recompute_ratio=ratio, exact_when_faster=False)
                run = lambda cfg=cfg: engine.prepare(segments, config=cfg)  # noqa: E731
                run()  # warm-up: compiled kernels, RoPE tables, the blocks promoted where they go
                add("profile", f"{strategy} [{label}]", shape, **profile_call(run, device))
    finally:
        engine.store.tiers = tiers
