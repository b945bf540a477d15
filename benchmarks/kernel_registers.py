"""Compile each Triton kernel for sm_90 (H100 / H200) without a GPU: registers, spills, shared memory.

Triton's bundled ptxas assembles every kernel the way a launch on the engine's tensors would specialise it
(unit stride on head_dim, 16-byte aligned pointers and other strides), in bf16, fp16 and fp32: attention at
head_dim 128 (GQA group 4), 64 (1) and 96 (7) with its default tile (and, in bf16 at 128, every tile of
gpu_common.SWEEP), rotary and deviation at head_dim 128. Catches kernels that do not compile for CUDA (the
interpreter accepts more) and tiles that spill registers. Exit status 1 if a kernel did not compile.

    python benchmarks/kernel_registers.py --out kernel_registers.json
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from gpu_common import SWEEP, Report

DTYPES = ("bf16", "fp16", "fp32")


class Compiler:
    """Compiles one kernel at a time for sm_90 and adds a ``compile`` row to ``report``."""

    def __init__(self, report: Report) -> None:
        import triton
        from triton.backends.compiler import GPUTarget

        self.report = report
        self.bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        self.target = GPUTarget("cuda", 90, 32)

    def build(self, fn, sig: dict, consts: dict, unit: tuple, options: dict, label: str) -> None:
        """Compile ``fn`` with signature ``sig`` (name -> Triton type), ``consts`` and the strides in ``unit`` set
        to 1; then ptxas reports registers and spills."""
        import triton
        from triton.compiler import ASTSource

        consts = {**consts, **dict.fromkeys(unit, 1)}
        aligned = [n for n in sig if n not in consts and (n.endswith("_ptr") or n.startswith("stride"))]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        signature = {**{k: v for k, v in sig.items() if k not in consts}, **dict.fromkeys(consts, "constexpr")}
        try:
            source = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
            kernel = triton.compile(source, target=self.target, options=options)
        except Exception as exc:
            self.report.failed.append(f"compile {label}")
            self.report.add("compile", label, options_str(options), error=f"{type(exc).__name__}: {str(exc)[:160]}")
            return
        report = self.ptxas(kernel.asm["ptx"])
        regs = re.search(r"Used (\d+) registers", report)
        spill = re.search(r"(\d+) bytes spill stores", report)
        self.report.add(
            "compile",
            label,
            options_str(options),
            regs=int(regs.group(1)) if regs else "?",
            spill_bytes=int(spill.group(1)) if spill else "?",
            smem=kernel.metadata.shared,
            wgmma="wgmma" in kernel.asm["ptx"],
        )

    def ptxas(self, ptx: str) -> str:
        """ptxas -v's report on ``ptx`` ("" when no bundled ptxas could assemble it)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.ptx"
            path.write_text(ptx)
            for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads newer PTX
                if (self.bin_dir / name).exists():
                    command = [str(self.bin_dir / name), "-v", "--gpu-name=sm_90a", str(path), "-o", f"{tmp}/k.cubin"]
                    proc = subprocess.run(command, capture_output=True, text=True)
                    if proc.returncode == 0:
                        return proc.stderr
        return ""


def strides(names: list[str]) -> dict:
    return {n: "i32" for n in names}


def options_str(options: dict) -> str:
    return ",".join(f"{k.removeprefix('num_')}={v}" for k, v in options.items() if k != "enable_fp_fusion")


def attention_rows(compiler: Compiler, dt: str) -> None:
    import torch
    import triton

    from cacheblend_rag.kernels import attention

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    qkvo = strides([f"stride_{a}{b}" for a in "qkvo" for b in ("h", "m" if a in "qo" else "n", "d")])
    for d, group in ((128, 4), (64, 1), (96, 7)):
        configs = [attention.attention_config(d, torch_dtype)]  # the default first
        if dt == "bf16" and d == 128:
            configs += [c for c in SWEEP if c != configs[0]]
        for cfg in configs:
            sig = {
                "q_ptr": f"*{dt}",
                "pos_ptr": "*i64",
                "k_ptr": f"*{dt}",
                "v_ptr": f"*{dt}",
                "o_ptr": f"*{dt}",
                "qk_scale": "fp32",
                "M": "i32",
                "N": "i32",
                **qkvo,
            }
            consts = {
                "GROUP": group,
                "HEAD_DIM": d,
                "BLOCK_D": triton.next_power_of_2(d),
                "BLOCK_M": cfg["block_m"],
                "BLOCK_N": cfg["block_n"],
                "FP32": dt == "fp32",
                "UPCAST": False,
            }
            options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "enable_fp_fusion": True}
            label = f"attention {dt} D={d} G={group} {cfg['block_m']}x{cfg['block_n']}"
            unit = ("stride_qd", "stride_kd", "stride_vd", "stride_od")
            compiler.build(
                attention.attention_kernel,
                sig,
                consts,
                unit,
                options,
                label + (" default" if cfg is configs[0] else ""),
            )


def rotary_row(compiler: Compiler, dt: str) -> None:
    from cacheblend_rag.kernels import rotary

    sig = {
        "x_ptr": f"*{dt}",
        "out_ptr": f"*{dt}",
        "pos_ptr": "*i64",
        "cos_ptr": f"*{dt}",
        "sin_ptr": f"*{dt}",
        "T": "i32",
        **strides(["stride_xh", "stride_xt", "stride_xd", "stride_oh", "stride_ot", "stride_od", "stride_table"]),
    }
    consts = {"HALF": 64, "BLOCK_HALF": 64, "BLOCK_T": 32}
    options = {"num_warps": 4, "enable_fp_fusion": False}
    compiler.build(rotary.rope_kernel, sig, consts, ("stride_xd", "stride_od"), options, f"rotary {dt} D=128")


def deviation_row(compiler: Compiler, dt: str) -> None:
    from cacheblend_rag.kernels import deviation

    sig = {
        "fresh_ptr": f"*{dt}",
        "cached_ptr": f"*{dt}",
        "from_ptr": "*u8",
        "rows_ptr": "*i64",
        "out_ptr": "*fp32",
        "H": "i32",
        "T": "i32",
        "D": "i32",
        **strides([f"stride_{a}{b}" for a in "fc" for b in "htd"]),
    }
    consts = {"HAS_ROWS": True, "BLOCK_T": 32, "BLOCK_D": 128}
    options = {"num_warps": 4, "enable_fp_fusion": True}
    unit = ("stride_fd", "stride_cd")
    compiler.build(deviation.deviation_kernel, sig, consts, unit, options, f"deviation {dt} D=128")


def compile_rows(report: Report) -> None:
    """A ``compile`` row per kernel, dtype and tile."""
    compiler = Compiler(report)
    for dt in DTYPES:
        attention_rows(compiler, dt)
        rotary_row(compiler, dt)
        deviation_row(compiler, dt)


def main(argv: list[str] | None = None) -> int:
    from gpu_common import setup

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("kernel_registers.json"))
    args = parser.parse_args(argv)
    setup(interpret=False)
    report = Report()
    compile_rows(report)
    return report.finish(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
