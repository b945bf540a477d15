"""What a request's prefill costs under each strategy, estimated before it runs, so that the engine never blends
where computing the prompt in full is as fast.

Blending saves the rows it does not compute, and pays for two passes over the layers (the query selection's probe,
then the prefill proper) and for placing the stored KV of every cached row at every layer. On a long prompt of
reused chunks the saving wins by far; on a short prompt, or one with few cached tokens, the fixed costs of a pass
are more than the rows saved, and a blended prefill is slower than the full one (and no better).

The estimate counts, per layer, the FLOPs of the rows a pass computes (projections and MLP), of their attention
(each computed row reads every key up to its position), and a fixed cost per pass worth ``PASS_ROWS`` rows (the
work that does not shrink with the rows: launching the layer's operations on a GPU, the layer's Python and small
operations on a CPU), plus, for the cached rows, the work of placing their stored K/V (``CACHED_ROW`` of a
computed row's FLOPs: copying and rotating keys). The constants are properties of this implementation, measured
with ``benchmarks/strategy_cost.py`` (short prompts on every strategy); docs/BENCHMARKS.md 1.12 has the runs.
"""

from __future__ import annotations

from dataclasses import dataclass

PASS_ROWS = 48.0  # the fixed cost of one pass over a layer, in rows computed
CACHED_ROW = 0.02  # placing one cached row's stored K/V at a layer, in rows computed
MARGIN = 0.85  # blend only where its estimate is below this share of full recompute's


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: layers, width, attention heads and the MLP's inner width."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, fwd) -> ModelShape:
        return cls(
            fwd.n_layers, fwd.hidden_size, fwd.n_heads, fwd.n_kv_heads, fwd.head_dim, fwd.config.intermediate_size
        )

    @property
    def row_flops(self) -> float:
        """FLOPs of one row through one layer, attention scores aside: q/k/v/o projections and the gated MLP."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return 2.0 * (self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate)

    @property
    def key_flops(self) -> float:
        """FLOPs of one (row, key) pair of attention: scores and the weighted sum."""
        return 4.0 * self.n_heads * self.head_dim


@dataclass(frozen=True)
class Estimate:
    """Estimated prefill costs of one request, in FLOPs (comparable with each other, not seconds)."""

    full: float
    blend: float
    margin: float = MARGIN

    @property
    def blend_wins(self) -> bool:
        return self.blend < self.margin * self.full

    @property
    def reason(self) -> str:
        """Why the exact path runs (when the blend does not win)."""
        return (
            f"computed in full: blending would cost about {self.blend / self.full:.0%} of a full prefill here "
            "(a short prompt or few cached tokens), no faster"
        )


@dataclass(frozen=True)
class CostModel:
    """The cost constants: ``pass_rows``, a pass over a layer in rows computed; ``cached_row``, placing one cached
    row's stored K/V at a layer, in rows computed; ``margin``: blend only where its estimate is below this share of
    full recompute's."""

    pass_rows: float = PASS_ROWS
    cached_row: float = CACHED_ROW
    margin: float = MARGIN

    def pass_cost(self, shape: ModelShape, rows: int, positions: int, cached: int) -> float:
        """One pass over every layer computing ``rows`` rows whose positions sum to ``positions`` (each reads that
        many keys, plus one), with ``cached`` rows placed from the store."""
        per_layer = (rows + self.pass_rows + self.cached_row * cached) * shape.row_flops
        return shape.n_layers * (per_layer + (positions + rows) * shape.key_flops)

    def estimate(self, shape: ModelShape, n: int, cached_spans: list[tuple[int, int]], ratio: float, probe: bool):
        """Costs of a prompt of ``n`` rows whose rows ``start..end-1`` of each of ``cached_spans`` are cached,
        blended at ``ratio`` of the cached rows (``probe``: with the query selection's probe pass), against
        computing it in full."""
        all_positions = n * (n - 1) // 2
        full = self.pass_cost(shape, n, all_positions, 0)
        n_cached = sum(end - start for start, end in cached_spans)
        cached_positions = sum((start + end - 1) * (end - start) // 2 for start, end in cached_spans)
        uncached = n - n_cached
        chosen = round(ratio * n_cached)
        # the recomputed cached rows sit anywhere in the chunks: count them at the chunks' mean position
        mean_cached = cached_positions / n_cached if n_cached else 0.0
        uncached_positions = all_positions - cached_positions
        blend = self.pass_cost(shape, uncached + chosen, int(uncached_positions + chosen * mean_cached), n_cached)
        if probe:
            blend += self.pass_cost(shape, uncached, uncached_positions, n_cached)
        return Estimate(full=full, blend=blend, margin=self.margin)
