"""How a request picks its tokens: ``SamplingParams`` (validated once, shared by the engine, the integrations and
the server) and the ``Sampler`` that follows them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# A temperature or top_p below this is greedy decoding (as vLLM does): such a distribution is the top token, and
# dividing the logits by so small a temperature would overflow to inf (then softmax gives NaN).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """max_new_tokens: the most tokens to generate (a request also stops at EOS or a stop string).
    temperature: 0 is greedy; above 0, softmax(logits / temperature) restricted to the top_p nucleus.
    top_p: keep the smallest set of tokens whose probability reaches it. seed: seeds the sampler (None: unseeded).
    stop: a string or strings; generation ends at the first one, which is cut from the text (stored as a tuple).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = ()

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or not math.isfinite(t):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not -(2**63) <= s < 2**64):
            raise ValueError(f"seed must be an int (or None for an unseeded sampler), got {s!r}")
        object.__setattr__(self, "stop", normalize_stop(self.stop))

    @classmethod
    def of(cls, sampling: SamplingParams | None = None, options: Mapping[str, object] | None = None) -> SamplingParams:
        """``sampling`` (default: the defaults) with the keyword ``options`` applied; an unknown option is a
        TypeError naming the fields."""
        base = sampling if sampling is not None else cls()
        if not isinstance(base, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(base).__name__}")
        if not options:
            return base
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; the options are {', '.join(names)}")
        return dataclasses.replace(base, **options)


def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (None: none)."""
    if stop is None:
        return ()
    if not isinstance(stop, (str, list, tuple, set, frozenset)):
        raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in items):
        raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
    return items


class Sampler:
    """Picks tokens as ``params`` says: greedy when temperature == 0 (or temperature or top_p is below
    ``GREEDY_BELOW``), else temperature + nucleus (top_p) sampling, seeded if ``params.seed`` is set (one generator
    per request)."""

    def __init__(self, params: SamplingParams) -> None:
        greedy = params.temperature < GREEDY_BELOW or params.top_p < GREEDY_BELOW
        self.temperature = 0.0 if greedy else float(params.temperature)
        self.top_p = 1.0 if greedy else float(params.top_p)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    @property
    def greedy(self) -> bool:
        """Picks the top token (argmax) every time."""
        return self.temperature == 0.0

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] -> token id."""
        if self.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= self.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_rows(samplers: Sequence[Sampler], logits: Sequence[torch.Tensor]) -> list[int]:
    """One token per sequence of a batch: logits[i] ([vocab]) picked by samplers[i]. The greedy rows' argmax is
    taken in one call (one device read on a GPU instead of one per row): the token their Sampler would pick."""
    tokens = [0] * len(samplers)
    greedy = [i for i, sampler in enumerate(samplers) if sampler.greedy]
    if greedy:
        top = torch.stack([logits[i] for i in greedy]).argmax(dim=-1).tolist()
        for i, token in zip(greedy, top, strict=True):
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if not sampler.greedy:
            tokens[i] = sampler(logits[i])
    return tokens
