"""What the GPU scripts share (gpu_check.py, kernel_check.py, prefill_check.py, kernel_registers.py): the report
they fill, timers, the relative error, the model shapes, and ``setup``, which each script's ``main`` calls first.

Nothing here runs at import: no environment is changed and no argument is read until ``setup``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Llama 3.1's RoPE scaling, for the kernels' RoPE table and the random model
ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Llama-3-8B's shapes, and the tiny ones of --smoke
LLAMA3_8B = {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "hidden": 4096, "intermediate": 14336, "vocab": 128256}
SMOKE = {"q_heads": 4, "kv_heads": 2, "head_dim": 32, "hidden": 128, "intermediate": 256, "vocab": 50_000}

SWEEP = [  # attention tiles timed by kernel_check --sweep; kernel_registers.py shows none of them spills at sm_90
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2},
    {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2},
    {"block_m": 128, "block_n": 32, "num_warps": 8, "num_stages": 3},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3},
]


def setup(interpret: bool) -> None:
    """Before anything imports Triton or cacheblend_rag: Triton's interpreter on if ``interpret`` (it must be on
    before any ``@triton.jit`` function is defined), and this checkout importable without installing it."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def device_and_dtype(smoke: bool) -> tuple[torch.device, torch.dtype] | None:
    """bf16 on CUDA, or on the CPU under --smoke; None (with a message) when there is no CUDA device."""
    if smoke:
        return torch.device("cpu"), torch.bfloat16
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    print("no CUDA device: run with --smoke for the CPU interpreter check", file=sys.stderr)
    return None


def environment(device: torch.device, smoke: bool, **fields) -> dict:
    import platform

    import triton

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "smoke": smoke,
        **fields,
        "note": "smoke: interpreter timings mean nothing" if smoke else "CUDA run",
    }


class Report:
    """The rows a run prints and writes (one per table line), the failed checks, and the sections that raised."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.failed: list[str] = []
        self.errors: dict[str, str] = {}

    def add(self, section: str, name: str, shape: str = "", **fields) -> dict:
        row = {"section": section, "name": name, "shape": shape, **fields}
        self.rows.append(row)
        values = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        print(f"  {section:9s} {name:34s} {shape:26s} {values}", flush=True)
        return row

    def check(self, section: str, name: str, shape: str, err: float, limit: float, **fields) -> None:
        """A correctness row: ``err`` (a relative error) must be at most ``limit``."""
        ok = err <= limit
        if not ok:
            self.failed.append(f"{section} {name} {shape}: rel_err {err:.3g} > {limit:.3g}")
        self.add(section, name, shape, rel_err=err, limit=limit, ok=ok, **fields)

    def run_sections(self, sections: list[tuple[str, object]], device: torch.device) -> None:
        """Run each (name, fn); one that raises is recorded and the others still run (a GPU run is one-shot)."""
        for name, fn in sections:
            print(f"== {name}", flush=True)
            try:
                fn()
            except Exception:
                self.errors[name] = traceback.format_exc()
                self.failed.append(f"{name}: raised")
                print(self.errors[name], file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def print_table(self) -> None:
        keys = ["section", "name", "shape"]
        widths = [max([len(k)] + [len(str(row[k])) for row in self.rows]) for k in keys]
        print("\n" + " | ".join(k.ljust(w) for k, w in zip(keys, widths)) + " | results")
        print("-+-".join("-" * w for w in widths) + "-+--------")
        for row in self.rows:
            rest = "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in keys)
            print(" | ".join(str(row[k]).ljust(w) for k, w in zip(keys, widths)) + " | " + rest)

    def finish(self, out: Path, **extra) -> int:
        """Print the table and the failures, write the JSON to ``out``; the exit status (1 if a check failed)."""
        self.print_table()
        took = f"; {extra['seconds']:.0f} s" if "seconds" in extra else ""
        listed = "" if not self.failed else ":\n  " + "\n  ".join(self.failed)
        print(f"\n{len(self.failed)} failed check(s){took}{listed}")
        report = {**extra, "rows": self.rows, "failed": self.failed, "errors": self.errors}
        out.write_text(json.dumps(report, indent=1, default=str))
        return 1 if self.failed else 0


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class Timer:
    """Median time of ``fn`` in ms: CUDA events with the L2 flushed before each run; wall clock on CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int = 3) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn, reps: int | None = None) -> float:
        reps = reps or self.reps
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
            return statistics.median(times)
        torch.cuda.synchronize()
        events = []
        for _ in range(reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time in ms of a host-driven call (the engine's prefill), synchronised at both ends."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over finite entries (in float64)."""
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)):
        return math.inf
    diff = (out[finite] - ref[finite]).norm()
    return float(diff / ref[finite].norm().clamp_min(1e-30))


def int_list(text: str) -> list[int]:
    """``"4096,16384"`` -> [4096, 16384] (an argparse type)."""
    return [int(x) for x in text.split(",")]
