"""The engine's blended prefill against full prefills, on a random-weight model of Llama-3-8B shape in bf16.

For each prompt length (about 8k and 16k tokens by default; chunks of 512 tokens between a short prefix and a
64-token question), with every chunk precomputed into the engine's store (on CUDA a device tier over a pinned
host tier, docs/GPU.md):

- precompute tokens/s against the full prefill's (target >= 0.5);
- Hugging Face's own forward (SDPA) against the engine's full_recompute and its cacheblend prefill at 15% with
  the Triton and the torch kernels (``blend_vs_hf_full``, target >= 3);
- decoding ms per token: the engine (a CUDA graph on CUDA) against Hugging Face's ``generate`` with a static
  cache (target: no slower);
- with ``--profile``, one row per strategy and store tier (gpu_profile.py): wall vs GPU-busy time, host syncs,
  host-to-device copies per request.

``--layers`` fewer than 32 saves time or memory; the table says how many ran.

    python benchmarks/prefill_check.py --profile --out prefill_check.json    # CUDA
    python benchmarks/prefill_check.py --smoke --profile --out smoke.json     # CPU, Triton's interpreter, tiny
``gpu_check.py`` runs this and kernel_check.py in one go.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gpu_common import LLAMA3_8B, ROPE_LLAMA3, SMOKE, Report, int_list, sync, wall_ms


def word_tokenizer(vocab: int):
    """A whitespace word-level tokenizer over words ``w0``..``w{vocab-4}``: one word, one token, no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_llama(shape: dict, layers: int, device: torch.device, dtype: torch.dtype):
    """A Llama of ``shape`` (gpu_common.LLAMA3_8B or SMOKE) with random weights, built in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=shape["q_heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        rope_parameters=ROPE_LLAMA3,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        attn_implementation="sdpa",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


class Prompts:
    """Random word prompts: a prefix, precomputed chunks, a question (token counts per ``smoke``)."""

    def __init__(self, smoke: bool) -> None:
        self.chunk, self.prefix, self.question = (20, 4, 6) if smoke else (512, 32, 64)
        self.gen = torch.Generator().manual_seed(0)

    def words(self, count: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, 49_000, (count,), generator=self.gen).tolist())

    def chunks(self, n: int) -> list[str]:
        """As many chunk texts as fit in an ``n``-token prompt beside the prefix and the question (at least one)."""
        room = n - self.prefix - self.question
        return [self.words(self.chunk) for _ in range(max(1, room // self.chunk))]


def prefill_rows(report: Report, args, device: torch.device, dtype: torch.dtype) -> None:
    """Build the model and the engine, then for each prompt length: precompute, prefills, decode, profile."""
    from cacheblend_rag import BlendConfig, CacheBlendEngine

    shape = SMOKE if args.smoke else LLAMA3_8B
    t0 = time.perf_counter()
    model = random_llama(shape, args.layers, device, dtype)
    prompts = Prompts(args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":  # the device tier first, the pinned host tier under it (docs/GPU.md)
            store = ["memory://?device=cuda&max_bytes=40GB", "memory://?pin=1&max_bytes=100GB"]
        else:
            store = ["memory://?max_bytes=8GB"]
        tokenizer = word_tokenizer(min(shape["vocab"], 50_000))
        config = BlendConfig(backend="triton", exact_when_faster=False)
        engine = CacheBlendEngine(model, tokenizer, store=store, store_dtype=dtype, cache_dir=tmp, config=config)
        params = sum(p.numel() for p in model.parameters()) / 1e9
        report.add("prefill", "model built", f"{args.layers} layers", seconds=time.perf_counter() - t0, params_B=params)
        for n in args.prefill_lengths:
            chunks = prompts.chunks(n)
            t = time.perf_counter()
            handles = engine.precompute(chunks, context=0)
            sync(device)
            seconds = time.perf_counter() - t
            rate = sum(h.n_tokens for h in handles) / seconds
            shape_label = f"{len(chunks)}x{prompts.chunk}"
            report.add("prefill", "precompute chunks", shape_label, seconds=seconds, tokens_per_s=rate)
            segments = [prompts.words(prompts.prefix) + " ", *handles, " " + prompts.words(prompts.question)]
            with torch.inference_mode():
                hf_ms, n_tokens = time_prefills(report, args, device, model, engine, segments)
            hf_rate = n_tokens / (hf_ms / 1e3)
            report.add("prefill", "precompute vs HF full", f"N={n_tokens}", ratio=rate / hf_rate, target=">= 0.5")
            time_decode(report, args, device, model, engine, segments)
            if args.profile:
                from gpu_profile import profile_section

                with torch.inference_mode():
                    profile_section(report.add, engine, segments, device, args.ratio)


def prompt_ids(engine, segments, device: torch.device) -> torch.Tensor:
    """[1, N] token ids of segments (text, chunk handles..., text), as the engine's prompt has them."""
    prompt = engine.tokenize(segments[0]) + [i for h in segments[1:-1] for i in h.token_ids]
    return torch.tensor(prompt + engine.tokenize(segments[-1]), device=device)[None]


def time_prefills(report: Report, args, device, model, engine, segments) -> tuple[float, int]:
    """Hugging Face's full forward vs the engine's full and blended prefills of one prompt: (HF ms, tokens)."""
    from cacheblend_rag import BlendConfig

    ids = prompt_ids(engine, segments, device)
    shape = f"N={ids.shape[1]}"

    def hf_full():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -1:])

    def prepare(strategy: str, backend: str):
        cfg = BlendConfig(strategy=strategy, backend=backend, recompute_ratio=args.ratio, exact_when_faster=False)
        return lambda: engine.prepare(segments, config=cfg)

    hf_ms = wall_ms(hf_full, device, args.prefill_reps)
    report.add("prefill", "HF forward (SDPA), full", shape, ms=hf_ms)
    results = {}
    for label, strategy, backend in (
        ("full_recompute triton", "full_recompute", "triton"),
        ("cacheblend 15% triton", "cacheblend", "triton"),
        ("cacheblend 15% torch", "cacheblend", "torch"),
    ):
        if backend == "torch" and ids.shape[1] > 8192 and device.type == "cuda":
            continue  # the masked-SDPA reference is slow at 16k; the 8k row shows the kernels' share
        results[label] = ms = wall_ms(prepare(strategy, backend), device, args.prefill_reps)
        report.add("prefill", label, shape, ms=ms, speedup_vs_hf_full=hf_ms / ms)
    stats = prepare("cacheblend", "triton")().stats
    report.add(
        "prefill",
        "cacheblend rows per layer",
        shape,
        recomputed=stats.recomputed_tokens,
        first_layers=str(stats.layer_rows[:3]),
        blend_vs_engine_full=results["full_recompute triton"] / results["cacheblend 15% triton"],
        blend_vs_hf_full=hf_ms / results["cacheblend 15% triton"],
        target_vs_hf=">= 3",
    )
    return hf_ms, ids.shape[1]


def time_decode(report: Report, args, device, model, engine, segments, new: int = 64) -> None:
    """Per-token decoding: the engine (CUDA graph on CUDA) against Hugging Face's generate with a static cache."""
    from cacheblend_rag import BlendConfig

    cfg = BlendConfig(strategy="cacheblend", backend="triton", recompute_ratio=args.ratio, exact_when_faster=False)
    new = min(new, 8) if args.smoke else new
    engine.generate(segments, config=cfg, max_new_tokens=new)  # warm-up (and graph capture)
    stats = engine.generate(segments, config=cfg, max_new_tokens=new).stats
    engine_ms = 1e3 * stats.decode_s / max(stats.new_tokens - 1, 1)
    ids = prompt_ids(engine, segments, device)
    hf = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=1)
    if device.type == "cuda":
        hf["cache_implementation"] = "static"

    def generate(n):
        return lambda: model.generate(ids, **{**hf, "max_new_tokens": n, "min_new_tokens": n})

    with torch.inference_mode():
        full = wall_ms(generate(new), device, 1)
        first = wall_ms(generate(1), device, 1)
    hf_ms = (full - first) / (new - 1)
    report.add(
        "decode",
        "ms per token, engine vs HF generate",
        f"N={ids.shape[1]}",
        engine_ms=engine_ms,
        hf_ms=hf_ms,
        graph_steps=stats.graph_steps,
        engine_vs_hf=hf_ms / engine_ms,
        target=">= 1",
    )


def add_args(parser: argparse.ArgumentParser) -> None:
    """This script's options (gpu_check.py takes them too)."""
    parser.add_argument("--prefill-lengths", type=int_list, default=None, help="prompt tokens (default 8192,16384)")
    parser.add_argument("--layers", type=int, default=32, help="layers of the random Llama-3-8B-shaped model")
    parser.add_argument("--prefill-reps", type=int, default=None, help="timed prefills, median (default 3)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="per strategy and store tier: wall vs GPU-busy time, host syncs, host-to-device copies (gpu_profile.py)",
    )


def smoke_defaults(args) -> None:
    """Fill the options not given: Llama-3-8B lengths, or tiny ones (and at most 3 layers) under --smoke."""
    args.prefill_lengths = args.prefill_lengths or ([90] if args.smoke else [8192, 16384])
    args.prefill_reps = args.prefill_reps or (1 if args.smoke else 3)
    if args.smoke:
        args.layers = min(args.layers, 3)


def main(argv: list[str] | None = None) -> int:
    from gpu_common import device_and_dtype, environment, setup

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=Path("prefill_check.json"))
    parser.add_argument("--ratio", type=float, default=0.15, help="cacheblend's recompute ratio")
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
    report.run_sections([("prefill", lambda: prefill_rows(report, args, device, dtype))], device)
    env = environment(device, args.smoke, layers=args.layers, prefill_lengths=args.prefill_lengths)
    return report.finish(args.out, env=env, seconds=time.perf_counter() - started)


if __name__ == "__main__":
    raise SystemExit(main())
