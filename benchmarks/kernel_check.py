"""The Triton blending kernels at real shapes: correct against float32 references, and how fast.

At Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128, bf16; 4k and 16k tokens by default) each kernel
(rotary, deviation, selected attention) is

- checked by relative error ``||out - ref|| / ||ref||`` against a float32 reference computed from the same bf16
  inputs (rows ``check``; exit status 1 if one fails);
- timed against its torch reference with CUDA events (median of ``--reps`` runs, L2 flushed before each), with
  the baselines the targets name: a device copy of the same bytes (rotation, target >= 80% of its bandwidth) and
  full causal prefill attention through SDPA / flash (selected attention at 15%, target >= 4x faster) (rows
  ``time``); and the attention kernel's tiles swept at the longest length (rows ``sweep``).

    python benchmarks/kernel_check.py --out kernel_check.json                     # CUDA
    python benchmarks/kernel_check.py --smoke --out smoke.json                    # CPU, Triton's interpreter, tiny
``gpu_check.py`` runs this and prefill_check.py in one go.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_common import LLAMA3_8B, ROPE_LLAMA3, SMOKE, SWEEP, Report, Timer, int_list, rel_err


def llama3_rope(head_dim: int, n_heads: int):
    """Llama 3.1's scaled RoPE frequencies as a RopeTable, taken from Hugging Face's rotary module."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from cacheblend_rag.kernels import rotary

    config = LlamaConfig(
        hidden_size=head_dim * n_heads,
        num_attention_heads=n_heads,
        rope_parameters=ROPE_LLAMA3,
        max_position_embeddings=131072,
    )
    module = LlamaRotaryEmbedding(config)
    return rotary.RopeTable(module.inv_freq, module.attention_scaling)


def selection(n: int, ratio: float, tail: int, gen: torch.Generator, device) -> torch.Tensor:
    """Sorted positions: ``ratio`` of the first n - tail (the cached chunks) plus the last ``tail`` (question)."""
    cached = n - tail
    picked = torch.randperm(cached, generator=gen)[: round(ratio * cached)]
    return torch.cat([picked.sort().values, torch.arange(cached, n)]).to(device)


class Case:
    """One length's inputs: random bf16 tensors from one generator, the shapes, the device."""

    def __init__(self, n: int, shape: dict, device: torch.device, dtype: torch.dtype) -> None:
        self.n, self.device, self.dtype = n, device, dtype
        self.hq, self.hkv, self.d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
        self.gen = torch.Generator().manual_seed(n)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=self.dtype)


def rotary_rows(report: Report, timer: Timer, case: Case) -> None:
    """One layer's keys, a view of a cache with spare capacity, rotated in place as the engine does; then the
    rotation of keys and queries timed against torch and a device copy of the same bytes."""
    from cacheblend_rag.kernels import rotary

    n, hkv, d = case.n, case.hkv, case.d
    rope = llama3_rope(d, case.hq)
    keys = case.randn(hkv, n + 64, d)[:, :n]
    positions = torch.arange(n, device=case.device)
    ref = rotary.apply_rope_torch(keys, positions, rope)
    ref32 = rotary.apply_rope_torch(keys.float(), positions, rope)
    out = keys.clone()
    rotary.apply_rope(out, positions, rope, out=out, backend="triton")
    report.check(
        "check",
        "rotary (in place)",
        f"[{hkv},{n},{d}]",
        rel_err(out, ref32),
        1e-2,
        bitwise_vs_torch=torch.equal(out, ref),
        torch_rel_err=rel_err(ref, ref32),
    )
    for heads, label in ((hkv, "keys"), (case.hq, "queries")):
        x = case.randn(heads, n, d)
        y = torch.empty_like(x)
        nbytes = 2 * x.numel() * x.element_size()
        t_tri = timer(lambda x=x: rotary.apply_rope_triton(x, positions, rope, x, n - 1))
        t_ref = timer(lambda x=x: rotary.apply_rope_torch(x, positions, rope, x))
        t_copy = timer(lambda x=x, y=y: y.copy_(x))
        report.add(
            "time",
            f"rotary in place, {label}",
            f"[{heads},{n},{d}]",
            triton_ms=t_tri,
            torch_ms=t_ref,
            speedup=t_ref / t_tri,
            triton_GBps=nbytes / t_tri / 1e6,
            copy_GBps=nbytes / t_copy / 1e6,
            of_copy_bw=t_copy / t_tri,
            target_met=t_copy / t_tri >= 0.8,
        )


def deviation_rows(report: Report, timer: Timer, case: Case) -> None:
    """The deviation at the check layer: every row computed, most from the cache; also with ``rows=``."""
    from cacheblend_rag.kernels import deviation

    n, hkv, d = case.n, case.hkv, case.d
    fresh = case.randn(n, hkv, d).transpose(0, 1)  # as project_kv returns it
    stored = case.randn(hkv, n, d)
    from_cache = (torch.rand(n, generator=case.gen) < 0.97).to(case.device)
    dev_ref = deviation.kv_deviation_torch(fresh, stored, from_cache)
    dev = deviation.kv_deviation(fresh, stored, from_cache, backend="triton")
    report.check("check", "deviation", f"[{hkv},{n},{d}]", rel_err(dev, dev_ref), 1e-5)
    rows = selection(n, 0.5, 32, case.gen, case.device)
    part = fresh[:, rows]
    dev_rows = deviation.kv_deviation(part, stored, from_cache[rows], rows=rows, backend="triton")
    ref_rows = deviation.kv_deviation_torch(part, stored[:, rows], from_cache[rows])
    shape = f"[{hkv},{rows.numel()},{d}]"
    report.check("check", "deviation (rows= gather fused)", shape, rel_err(dev_rows, ref_rows), 1e-5)
    t_tri = timer(lambda: deviation.kv_deviation_triton(fresh, stored, from_cache))
    t_ref = timer(lambda: deviation.kv_deviation_torch(fresh, stored, from_cache))
    report.add(
        "time",
        "deviation",
        f"[{hkv},{n},{d}]",
        triton_ms=t_tri,
        torch_ms=t_ref,
        speedup=t_ref / t_tri,
        triton_GBps=2 * fresh.numel() * fresh.element_size() / t_tri / 1e6,
    )


def attention_rows(report: Report, timer: Timer, case: Case, ratio: float, sweep: bool) -> None:
    """Selected attention, ``ratio`` of the cached rows plus a 64-token question against the whole fused cache,
    and every query (full causal), checked and timed; then the tiles in SWEEP if ``sweep``."""
    from cacheblend_rag.kernels import attention

    n, hq, hkv, d = case.n, case.hq, case.hkv, case.d
    scale = d**-0.5
    positions = torch.arange(n, device=case.device)
    kv = case.randn(2, hkv, n + 64, d)
    k, v = kv[0, :, :n], kv[1, :, :n]
    k_full, v_full = k.float().repeat_interleave(hq // hkv, 0), v.float().repeat_interleave(hq // hkv, 0)

    def sdpa_causal(q):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)

    for label, q_pos in (
        ("selected 15%", selection(n, ratio, min(64, n // 8), case.gen, case.device)),
        ("all queries (full causal)", positions),
    ):
        m = q_pos.numel()
        q = case.randn(m, hq, d).transpose(0, 1)  # as project_q returns it
        got = attention.selected_attention(q, q_pos, k, v, scale, backend="triton")
        if m == n:  # compare 1024 random rows: a float32 reference of all N rows could take the O(N^2) math path
            rows = torch.randperm(n, generator=case.gen)[:1024].sort().values.to(case.device)
            ref16 = sdpa_causal(q)[0][:, rows]
            got, q_ref, pos_ref = got[:, rows], q[:, rows], rows
        else:
            ref16 = attention.selected_attention_torch(q, q_pos, k, v, scale)
            q_ref, pos_ref = q, q_pos
        ref32 = attention.selected_attention_torch(q_ref.float(), pos_ref, k_full, v_full, scale)
        shape = f"q[{hq},{m},{d}] kv[{hkv},{n},{d}]"
        report.check(
            "check", f"attention, {label}", shape, rel_err(got, ref32), 2e-2, torch_rel_err=rel_err(ref16, ref32)
        )
        del ref32
        t_tri = timer(lambda q=q, q_pos=q_pos: attention.selected_attention_triton(q, q_pos, k, v, scale))
        if m == n:
            full_causal = timer(lambda q=q: sdpa_causal(q))
            speedup = full_causal / t_tri
            report.add(
                "time", f"attention, {label}", shape, triton_ms=t_tri, sdpa_causal_ms=full_causal, speedup=speedup
            )
        else:
            t_ref = timer(lambda q=q, q_pos=q_pos: attention.selected_attention_torch(q, q_pos, k, v, scale))
            selected = (t_tri, t_ref, shape, q, q_pos)
    t_tri, t_ref, shape, q, q_pos = selected
    report.add(
        "time",
        "attention, selected 15%",
        shape,
        triton_ms=t_tri,
        torch_masked_sdpa_ms=t_ref,
        speedup=t_ref / t_tri,
        full_causal_sdpa_ms=full_causal,
        vs_full_causal=full_causal / t_tri,
        target_met=full_causal / t_tri >= 4.0,
    )
    if not sweep:
        return
    for cfg in SWEEP:
        label = "attention 15% " + ",".join(f"{key}={val}" for key, val in cfg.items())
        try:
            t = timer(lambda cfg=cfg: attention.selected_attention_triton(q, q_pos, k, v, scale, **cfg), reps=10)
            report.add("sweep", label, shape, triton_ms=t, vs_full_causal=full_causal / t)
        except Exception as exc:  # a config may not fit in shared memory: record it, keep going
            report.add("sweep", label, shape, error=f"{type(exc).__name__}: {str(exc)[:120]}")


def sections(report: Report, args, device: torch.device, dtype: torch.dtype) -> list:
    """One (name, fn) per length: every kernel checked and timed at that length."""
    shape = SMOKE if args.smoke else LLAMA3_8B
    timer = Timer(device, args.reps, args.warmup)

    def run(n: int) -> None:
        case = Case(n, shape, device, dtype)
        rotary_rows(report, timer, case)
        deviation_rows(report, timer, case)
        attention_rows(report, timer, case, args.ratio, args.sweep and n == max(args.lengths))

    return [(f"kernels N={n}", lambda n=n: run(n)) for n in args.lengths]


def add_args(parser: argparse.ArgumentParser) -> None:
    """This script's options (gpu_check.py takes them too)."""
    parser.add_argument("--lengths", type=int_list, default=None, help="token counts (default 4096,16384)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per kernel, median (default 30)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the attention tile sweep")


def smoke_defaults(args) -> None:
    """Fill the options not given: Llama-3-8B lengths, or tiny ones under --smoke."""
    args.lengths = args.lengths or ([45, 97] if args.smoke else [4096, 16384])
    args.reps = args.reps or (2 if args.smoke else 30)
    args.warmup = 1 if args.smoke else 3


def main(argv: list[str] | None = None) -> int:
    from gpu_common import device_and_dtype, environment, setup

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=Path("kernel_check.json"))
    parser.add_argument("--ratio", type=float, default=0.15, help="share of the cached rows selected")
    add_args(parser)
    args = parser.parse_args(argv)
    smoke_defaults(args)
    setup(interpret=args.smoke)
    found = device_and_dtype(args.smoke)
    if found is None:
        return 2
    device, dtype = found
    started = time.perf_counter()
    report = Report()
    report.run_sections(sections(report, args, device, dtype), device)
    env = environment(device, args.smoke, lengths=args.lengths)
    return report.finish(args.out, env=env, seconds=time.perf_counter() - started)


if __name__ == "__main__":
    raise SystemExit(main())
