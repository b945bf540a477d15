"""The quality evaluation: every strategy and ratio against gold answers and against full recompute.

Per example, ``full_recompute`` answers first (greedy, up to 32 new tokens, answer cut at the first
newline); its answer tokens are the reference. Every other configuration then runs its own prefill once:
it answers greedily from it (TTFT, gold F1 / EM, exact match and Rouge-L against the reference answer), and,
rewinding the cache to the end of the prompt, is teacher-forced along the reference answer tokens to compare
next-token distributions with full recompute's (top-1 agreement, KL(full || strategy)).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..config import BlendConfig
from ..engine.research import teacher_force
from ..engine.strategies import options_read
from ..neighbours import MINILM, Embed, minilm_embeddings
from .datasets import Example, passage_contexts
from .metrics import best_over, exact_match, f1_score, kl_divergence, rouge_l, top1_agreement
from .ttft import run_info

REFERENCE = "full_recompute"
ANSWERED = 0.5  # gold F1 at which full recompute counts as answering a question
BASELINE = "full_reuse"  # no configuration should answer worse than reusing every chunk as it is


@dataclass(frozen=True)
class EvalConfig:
    label: str
    config: BlendConfig


def eval_configs(
    strategies: Sequence[str],
    ratios: Sequence[float],
    selections: Sequence[str] = ("query",),
    targets: Sequence[float] = (),
    options: dict | None = None,
) -> list[EvalConfig]:
    """One entry per strategy, and per selection and ratio (and fidelity target) for cacheblend; full_recompute
    always comes first.

    cacheblend labels are ``cacheblend[query]@0.15`` (selection, ratio) and ``cacheblend[query]~0.9`` (selection,
    fidelity target); ``options``: other BlendConfig options for cacheblend (chunk heads, check layers, ...), each
    given to the selections that read it."""
    out = [EvalConfig(REFERENCE, BlendConfig(strategy=REFERENCE))]
    for strategy in strategies:
        if strategy == REFERENCE:
            continue
        if strategy == "cacheblend":
            for selection in selections:
                reads = options_read(strategy, selection)
                given = {k: v for k, v in (options or {}).items() if k in reads}
                blend = BlendConfig(strategy=strategy, selection=selection, **given)
                out += [EvalConfig(f"cacheblend[{selection}]@{r:g}", blend.replace(recompute_ratio=r)) for r in ratios]
                out += [EvalConfig(f"cacheblend[{selection}]~{t:g}", blend.replace(fidelity_target=t)) for t in targets]
        else:
            out.append(EvalConfig(strategy, BlendConfig(strategy=strategy)))
    return out


@dataclass
class Run:
    answer: str
    tokens: list[int]  # greedy tokens up to and including the one that ended the answer
    ttft_s: float
    stats: dict
    forced: torch.Tensor | None  # [T, V] log-probs along the reference tokens


def _run(engine, segments, config: BlendConfig, max_new_tokens: int, targets: list[int] | None) -> Run:
    eos = engine.eos_token_ids
    req = engine.prepare(segments, config=config, extra_capacity=max_new_tokens + 1)
    logits = req.logits
    ttft = time.perf_counter() - req.started
    tokens: list[int] = []
    steps = [logits]
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        if token in eos or "\n" in engine.tokenizer.decode(tokens, skip_special_tokens=True):
            break
        logits = req.decode(token)
        steps.append(logits)
    if targets is not None:
        forced = teacher_force(req, targets)  # rewinds to the prompt's end first
    else:
        forced = torch.log_softmax(torch.stack(steps[: len(tokens)]).float(), dim=-1)
    text = engine.tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
    return Run(text.split("\n")[0].strip(), tokens, ttft, req.stats.as_dict(), forced)


def evaluate(
    engine,
    examples: Sequence[Example],
    configs: Sequence[EvalConfig],
    max_new_tokens: int = 32,
    progress: bool = False,
    on_example: Callable[[dict], None] | None = None,
    context: int = 0,
    embed: Embed | None = None,
) -> dict:
    """Run every configuration on every example; returns per-example rows and a summary per configuration.

    ``context``: each passage's KV is computed after its ``context`` nearest passages among every distinct passage
    of ``examples`` (``passage_contexts``: the lexically nearest, as ``engine.precompute(corpus)`` picks them, or
    with ``embed`` the nearest by embedding, as ``cacheblend ingest`` picks them); 0: each alone. ``on_example``
    receives the result so far after each example (the CLI writes it to disk, so a long run that is interrupted
    keeps what it measured)."""
    rows = []
    labels = [c.label for c in configs]
    contexts = passage_contexts(examples, context, engine, embed) if context else None
    neighbours = {"context": context, "context_neighbours": context_neighbours(context, embed)}

    def result(done: int) -> dict:
        info = run_info(engine, n=done, max_new_tokens=max_new_tokens, configs=labels, **neighbours)
        return {"config": info, "examples": list(rows), "summary": summarize(rows, labels)}

    items = list(enumerate(examples))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="eval", unit="example")
    for index, example in items:
        segments = example.prompt(engine, context=contexts)
        ref = _run(engine, segments, configs[0].config, max_new_tokens, None)
        for item in configs:
            run = ref if item.label == REFERENCE else _run(engine, segments, item.config, max_new_tokens, ref.tokens)
            kl = kl_divergence(ref.forced, run.forced)
            rows.append(
                {
                    "example": index,
                    "config": item.label,
                    "strategy": item.config.strategy,
                    "recompute_ratio": run.stats["recompute_ratio"] if item.config.strategy == "cacheblend" else None,
                    "fidelity_target": item.config.fidelity_target if item.config.strategy == "cacheblend" else None,
                    "selection": item.config.selection if item.config.strategy == "cacheblend" else None,
                    "question": example.question,
                    "gold": example.answers,
                    "gold_passages": example.gold_passages,
                    "answer": run.answer,
                    "reference_answer": ref.answer,
                    "gold_f1": best_over(f1_score, run.answer, example.answers) if example.answers else None,
                    "gold_em": best_over(exact_match, run.answer, example.answers) if example.answers else None,
                    "answer_em_vs_full": exact_match(run.answer, ref.answer),
                    "rouge_l_vs_full": rouge_l(run.answer, ref.answer),
                    "top1_agreement": top1_agreement(ref.forced, run.forced),
                    "kl": kl.mean().item(),
                    "kl_max": kl.max().item(),
                    "ttft_s": run.ttft_s,
                    "prompt_tokens": run.stats["prompt_tokens"],
                    "reused_tokens": run.stats["reused_tokens"],
                    "recomputed_tokens": run.stats["recomputed_tokens"],
                }
            )
        if on_example is not None and index + 1 < len(examples):
            on_example({**result(index + 1), "partial": True})
    return result(len(examples))


LEXICAL = "lexical"  # neighbours by TF-IDF cosine over token ids (engine.nearest_contexts)


def context_neighbours(context: int, embed: Embed | None) -> str | None:
    """What chose each passage's neighbours (None when chunks were computed alone): ``LEXICAL``, or the embedding
    function's name (``MINILM`` for ``neighbours.minilm_embeddings``)."""
    if not context:
        return None
    if embed is None:
        return LEXICAL
    if embed is minilm_embeddings:
        return MINILM
    return getattr(embed, "__qualname__", type(embed).__name__)


def describe_context(config: dict) -> str:
    """How the chunks of a result were precomputed, for a table: from its ``config`` block."""
    k = config.get("context", 0)
    if not k:
        return "chunk KV computed alone (--context 0)"
    by = config.get("context_neighbours") or config.get("context_embedding") or "embeddings"
    if by == LEXICAL:
        by = "lexical: TF-IDF over token ids, as engine.precompute picks them"
    return f"chunk KV computed after each passage's {k} nearest passages of the examples ({by}; --context {k})"


def summarize(rows: list[dict], labels: Sequence[str]) -> list[dict]:
    ref_ttft = statistics.median(r["ttft_s"] for r in rows if r["config"] == REFERENCE)
    out = []
    for label in labels:
        mine = [r for r in rows if r["config"] == label]
        if not mine:
            continue
        median_ttft = statistics.median(r["ttft_s"] for r in mine)
        out.append(
            {
                "config": label,
                "strategy": mine[0]["strategy"],
                "recompute_ratio": _mean(r["recompute_ratio"] for r in mine),
                "fidelity_target": mine[0].get("fidelity_target"),
                "selection": mine[0].get("selection"),
                "n": len(mine),
                **{
                    key: _mean(r[key] for r in mine)
                    for key in ("gold_f1", "gold_em", "answer_em_vs_full", "rouge_l_vs_full", "top1_agreement", "kl")
                },
                **answered_quality(rows, label),
                "median_ttft_s": median_ttft,
                "speedup": ref_ttft / median_ttft,
                "recomputed_fraction": sum(r["recomputed_tokens"] for r in mine)
                / sum(r["prompt_tokens"] for r in mine),
            }
        )
    return out


def answered_quality(rows: list[dict], label: str) -> dict:
    """Gold F1 of ``label`` on the examples full recompute answers (its gold F1 >= ``ANSWERED``): ``answered`` (how
    many), ``gold_f1_answered`` (the mean), ``kept_answered`` (over full recompute's mean there), the same per
    number of passages an answer needs where the data says (``by_passages``: "1", "2+"), and
    ``worse_than_reuse``: answered examples where ``label`` scores below ``full_reuse`` (when it ran)."""
    by_example = {}
    for r in rows:
        by_example.setdefault(r["example"], {})[r["config"]] = r
    answered = [
        e for e in by_example.values() if e[REFERENCE]["gold_f1"] is not None and e[REFERENCE]["gold_f1"] >= ANSWERED
    ]

    def kept(group: list[dict]) -> dict:
        mine = [e for e in group if label in e]
        if not mine:
            return {"answered": 0, "gold_f1_answered": None, "kept_answered": None}
        ref = statistics.fmean(e[REFERENCE]["gold_f1"] for e in mine)
        got = statistics.fmean(e[label]["gold_f1"] for e in mine)
        return {"answered": len(mine), "gold_f1_answered": got, "kept_answered": got / ref}

    out = kept(answered)
    kinds = {"1": [e for e in answered if e[REFERENCE].get("gold_passages") == 1]}
    kinds["2+"] = [e for e in answered if (e[REFERENCE].get("gold_passages") or 0) >= 2]
    out["by_passages"] = {k: kept(v) for k, v in kinds.items() if v}
    worse = [e for e in answered if BASELINE in e and label in e and e[label]["gold_f1"] < e[BASELINE]["gold_f1"]]
    out["worse_than_reuse"] = len(worse) if any(BASELINE in e for e in answered) else None
    return out


def _mean(values) -> float | None:
    """Mean of the values that are not None (gold metrics exist only for examples with gold answers)."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None
