"""Answer and fidelity metrics: SQuAD F1 / exact match, Rouge-L, KL divergence, top-1 agreement."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over(metric, prediction: str, golds: Sequence[str]) -> float:
    """The best score over several gold answers."""
    return max((metric(prediction, g) for g in golds), default=0.0)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure over normalised tokens (longest common subsequence)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def kl_divergence(reference_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per position. Both: [T, V] log-probabilities -> [T]."""
    p = reference_logprobs.float()
    return (p.exp() * (p - other_logprobs.float())).sum(dim=-1).clamp_min(0.0)


def top1_agreement(reference_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> float:
    """Fraction of positions where both distributions have the same most likely token. [T, V] each."""
    if reference_logprobs.shape[0] == 0:
        return float("nan")
    return (reference_logprobs.argmax(-1) == other_logprobs.argmax(-1)).float().mean().item()
