"""The two interfaces: a ``Strategy`` turns a request's token runs into a PrefillPlan; a ``Selection`` is how the
cacheblend strategy picks the cached rows it recomputes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from typing import ClassVar

from ...model.forward import ModelForward
from ...store import KVStore
from ..chunk_reads import RequestChunks
from ..kv_cache import KVCache
from ..plan import PrefillPlan
from ..prefill import PrefillResult
from ..segments import TokenRun
from .reuse import ReusedChunks


class Strategy(ABC):
    """How a request's KV cache is assembled. ``plan`` resolves every chunk's KV (a miss is computed and stored
    there) and returns the plan the prefill runs; ``plan_steps`` is the same a step at a time (a selection's probe
    pass runs a layer per step); ``finish`` runs after the prefill (prefix_cache stores what it computed). One
    object per request, made by ``strategy_for`` from the request's BlendConfig.

    name: the ``BlendConfig.strategy`` that chooses it. options: the BlendConfig options it reads besides
    ``strategy`` and ``backend`` (an option it does not read is refused: ``strategy_for``). selects: whether it
    takes a Selection (then its constructor is ``cls(config, selection)``).
    """

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()
    selects: ClassVar[bool] = False

    def __init__(self, config) -> None:
        self.config = config

    @abstractmethod
    def plan(self, runs: list[TokenRun], chunks: RequestChunks, fwd: ModelForward, cache: KVCache) -> PrefillPlan:
        """The plan of a request: ``runs`` (placed token runs), its chunk KV through ``chunks``, run on ``fwd`` into
        ``cache`` (a selection's probe pass may fill it already)."""

    def plan_steps(
        self, runs: list[TokenRun], chunks: RequestChunks, fwd: ModelForward, cache: KVCache
    ) -> Generator[int, None, PrefillPlan]:
        """``plan`` a step at a time, for a scheduler that interleaves it with decoding: yields the rows x layers
        each step computed, returns the plan. By default one step that yields nothing (a plan without passes)."""
        return self.plan(runs, chunks, fwd, cache)
        yield  # a generator, whose only step is the plan

    def review(self, plan: PrefillPlan, result: PrefillResult) -> PrefillPlan | None:
        """After the prefill of ``plan``, before anything is answered: a plan to run instead (into the same cache,
        from its first layer) when ``result`` looks wrong, or None to keep it. By default, None."""
        return None

    def finish(self, plan: PrefillPlan, result: PrefillResult, store: KVStore) -> None:
        """After the prefill of ``plan``: nothing, unless the strategy stores what it computed."""
        return None

    @property
    def description(self) -> str:
        return f"strategy={self.name!r}"


class Selection(ABC):
    """How cacheblend picks the cached rows it recomputes: ``plan`` turns a request's reused chunks into the plan
    the prefill runs (with check layers and a scorer, or a fixed set of rows found by a probe pass, or anything a
    PrefillPlan can say); ``plan_steps`` is the same a step at a time (a rule with a pass over the model overrides
    it to run a layer per step). A new rule is one subclass with a ``name`` (``BlendConfig(selection=name)``) listed in
    ``strategies.SELECTIONS``; docs/DESIGN.md shows one.

    options: the BlendConfig options it reads (see ``Strategy.options``)."""

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config) -> None:
        self.config = config

    def check_model(self, fwd: ModelForward) -> None:
        """Raise ValueError if this selection cannot run on ``fwd``'s model (before any chunk is read)."""
        return None

    @abstractmethod
    def plan(self, reused: ReusedChunks, fwd: ModelForward, cache: KVCache) -> PrefillPlan:
        """The plan that recomputes the rows this rule picks among ``reused``'s cached rows (and every forced row:
        ``reused.forced``), with ``reused.report`` as its report. Runs on ``fwd``; may fill ``cache`` (a probe
        pass), then the plan says ``cache_ready``."""

    def review(self, plan: PrefillPlan, result: PrefillResult) -> PrefillPlan | None:
        """``Strategy.review`` for this rule's plans (a guard on the blend's answer); by default, None."""
        return None

    def plan_steps(self, reused: ReusedChunks, fwd: ModelForward, cache: KVCache) -> Generator[int, None, PrefillPlan]:
        """``plan`` a step at a time: yields the rows x layers each step computed, returns the plan. By default one
        step that yields nothing (a rule without a pass over the model)."""
        return self.plan(reused, fwd, cache)
        yield  # a generator, whose only step is the plan
