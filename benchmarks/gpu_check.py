"""The GPU check in one run: the Triton kernels (kernel_check.py), then the blended prefill (prefill_check.py).

On a CUDA machine (target: under 5 minutes on one H200) it

(a) checks every kernel against a float32 reference at Llama-3-8B-like shapes (32 query heads, 8 KV heads,
    head_dim 128, bf16, 4k and 16k tokens) and times it against its torch reference and the baselines the
    targets name, sweeping a few tiles of the attention kernel (kernel_check.py);
(b) times the engine's blended prefill (cacheblend, 15%) against full prefills (Hugging Face's own forward with
    SDPA, and the engine's full_recompute), precompute and decoding, on a random-weight model of Llama-3-8B
    shape (``--layers`` fewer than 32 to save time or memory; the table says how many ran); with ``--profile``
    also wall vs GPU-busy time, host syncs and host-to-device copies per request, per strategy and store tier
    (prefill_check.py, gpu_profile.py).

It prints one table and writes JSON (``--out``). Exit status 1 if a correctness check failed or a section
raised (the other sections still run); missed speed targets are reported, not fatal. Targets: docs/KERNELS.md
and docs/GPU.md. Registers and spills at sm_90, without a GPU: kernel_registers.py.

    python benchmarks/gpu_check.py --profile --out gpu_check.json          # CUDA
    python benchmarks/gpu_check.py --smoke --profile --out smoke.json      # CPU, Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse(argv: list[str] | None):
    import kernel_check
    import prefill_check

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--ratio", type=float, default=0.15, help="share of the cached rows recomputed")
    parser.add_argument("--no-prefill", dest="prefill", action="store_false", help="skip the model prefill timings")
    kernel_check.add_args(parser)
    prefill_check.add_args(parser)
    args = parser.parse_args(argv)
    kernel_check.smoke_defaults(args)
    prefill_check.smoke_defaults(args)
    return args


def main(argv: list[str] | None = None) -> int:
    from gpu_common import Report, device_and_dtype, environment, setup

    args = parse(argv)
    setup(interpret=args.smoke)
    import kernel_check
    import prefill_check

    found = device_and_dtype(args.smoke)
    if found is None:
        return 2
    device, dtype = found
    started = time.perf_counter()
    env = environment(
        device, args.smoke, layers=args.layers, lengths=args.lengths, prefill_lengths=args.prefill_lengths
    )
    print(json.dumps(env), flush=True)
    report = Report()
    sections = kernel_check.sections(report, args, device, dtype)
    if args.prefill:
        sections.append(("prefill", lambda: prefill_check.prefill_rows(report, args, device, dtype)))
    report.run_sections(sections, device)
    return report.finish(args.out, env=env, seconds=time.perf_counter() - started)


if __name__ == "__main__":
    raise SystemExit(main())
