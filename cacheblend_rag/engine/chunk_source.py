"""Where chunk KV comes from: the store, and the model on a miss (or for precompute).

A chunk is computed after the chunk prefix (``prefix_ids``: how the prompts it will be reused in begin) and its
context (``handle.context_ids``, the texts it was precomputed after; usually none), at positions 0..len-1; the
prefix and context rows are dropped and the keys kept before RoPE, so the chunk can be placed anywhere. It is
stored under its handle's key (``chunk_keys.py``). Concurrent misses on one chunk share one computation. What one
request reads goes through ``chunk_reads.RequestChunks``.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future

import torch

from ..model.forward import ModelForward
from ..neighbours import lexical_nearest
from ..store import ChunkHandle, ChunkKV, KVStore, LazyChunk
from .batch_compute import batches, compute_batch, default_batch_tokens
from .chunk_keys import ChunkKeys
from .kv_cache import KVCache
from .plan import PrefillPlan
from .prefill import prefill
from .stats import EngineMetrics

CONTEXT_TOKENS = 512  # a chunk's trimmed context holds <= max(chunk tokens, this) tokens per context text
MIN_CUT_TOKENS = 16  # a context text cut to fewer tokens than this is dropped instead
WORD_START = re.compile(r"\s+")
HEADS_REMEMBERED = 4096  # prompt heads whose keys ``head_seen`` remembers (the least recent forgotten first)


class ChunkSource:
    """Precomputation and the KV of a request's chunks.

    forward: computes missing chunks (on the kernels of ``backend``, or a request's); keys: the chunks' handles (and
    the prompt format that tokenizes them); metrics: the engine's counters; context_window: the model's, which a
    chunk and the prefix must fit in. batch_tokens: rows per precompute forward (several chunks each,
    ``batch_compute.py``); 0 computes one chunk per forward. Default: ``default_batch_tokens`` (batched on CUDA, one
    by one elsewhere).
    """

    def __init__(
        self,
        forward: ModelForward,
        store: KVStore,
        keys: ChunkKeys,
        metrics: EngineMetrics,
        *,
        context_window: int,
        backend: str = "auto",
        batch_tokens: int | None = None,
    ) -> None:
        self.forward = forward
        self.store = store
        self.keys = keys
        self.prefix_ids = keys.prefix_ids
        self.metrics = metrics
        self.context_window = context_window
        self.backend = backend
        self.batch_tokens = default_batch_tokens(forward.device) if batch_tokens is None else batch_tokens
        self._computing: dict[str, Future] = {}  # chunk key -> its computation in progress (one per key)
        self._computing_lock = threading.Lock()
        self._heads_seen: OrderedDict[str, None] = OrderedDict()  # keys of recent prompt heads (``head_seen``)
        self._heads_lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return self.keys.fingerprint

    # ---- computing ----------------------------------------------------------------------------------------
    def precompute(
        self,
        texts: Iterable[str],
        progress: bool = False,
        scope: str | None = None,
        context: Sequence[Sequence[str]] | int | None = 2,
    ) -> list[ChunkHandle]:
        """Compute and store the KV of every chunk not already stored in ``scope``; return one handle per text.

        context: an int k (each text after its k lexically nearest others in ``texts``, ``nearest_contexts``,
        trimmed by ``fitting_context``), 0 or None (each chunk alone after the chunk prefix), or one list of texts
        per text (its KV is computed after them)."""
        if isinstance(texts, str):
            raise TypeError("precompute takes a list of texts; wrap a single text: precompute([text])")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}; precompute takes strings")
        contexts = self.contexts(texts, context)
        handles = [self.keys.handle(t, scope, self.keys.context_ids(c)) for t, c in zip(texts, contexts)]
        self.store_missing(handles, progress)
        return handles

    def contexts(self, texts: list[str], context: Sequence[Sequence[str]] | int | None) -> list[list[str]]:
        """The texts each of ``texts`` is computed after (``precompute``'s ``context``): for an int k its k nearest
        (``nearest_contexts``) trimmed by ``fitting_context``; given lists as they are."""
        if context is None or not isinstance(context, int):
            return context_texts(texts, context)
        nearest = nearest_contexts(texts, context, self.keys.prompt_format.tokenize)
        return [self.fitting_context(t, c) for t, c in zip(texts, nearest)]

    def fitting_context(self, text: str, context: Sequence[str]) -> list[str]:
        """``context`` trimmed for a chunk of ``text``: at most ``len(context) * max(chunk tokens, CONTEXT_TOKENS)``
        tokens (a neighbour of thousands of tokens before a short chunk would cost its whole prefill every time the
        chunk is computed) and no more than fits the context window with the chunk. The texts nearest the chunk
        (the last) are kept whole; the first that would overflow keeps its end, from a word on, unless fewer than
        ``MIN_CUT_TOKENS`` tokens would be left of it; those before it are dropped."""
        tokenize = self.keys.prompt_format.tokenize
        n = len(tokenize(text))
        room = min(len(context) * max(n, CONTEXT_TOKENS), self.context_window - len(self.prefix_ids) - n)
        kept: list[str] = []
        for item in reversed(list(context)):
            size = len(tokenize(item))
            if size <= room:
                kept.append(item)
                room -= size
                continue
            tail = text_tail(item, room, tokenize) if room >= MIN_CUT_TOKENS else ""
            if tail:
                kept.append(tail)
            break
        return kept[::-1]

    def store_missing(self, handles: list[ChunkHandle], progress: bool = False) -> None:
        """Compute and store every one of ``handles`` (each after its ``context_ids``) the store lacks; a handle that
        could not be computed (no tokens, or too long for the context window with its context) raises first."""
        limit = self.context_window - len(self.prefix_ids)
        for i, handle in enumerate(handles):
            if not handle.token_ids:
                raise ValueError(f"texts[{i}] has no tokens (empty text); drop it before precompute")
            if handle.n_tokens + len(handle.context_ids) > limit:
                after = f" after {len(handle.context_ids)} of context" if handle.context_ids else ""
                raise ValueError(
                    f"texts[{i}] has {handle.n_tokens} tokens{after}, more than a chunk can have in the model's "
                    f"context window ({limit} of {self.context_window}); split it into smaller chunks"
                    + (" or give it a shorter context (engine.chunk_contexts trims one)" if after else "")
                )
        todo = {h.key: h for h in handles if not self.store.contains(h.key)}
        self.metrics.add(precompute_cache_hits=len(handles) - len(todo))
        if self.batch_tokens > 0:
            self._precompute_batched(list(todo.values()), progress)
            return
        items = todo.values()
        if progress and todo:
            from tqdm.auto import tqdm

            items = tqdm(items, total=len(todo), desc="precompute KV", unit="chunk")
        for handle in items:
            self.store.put(handle.key, self.compute(handle.token_ids, context_ids=handle.context_ids))
            self.metrics.add(precomputed_chunks=1)

    def _precompute_batched(self, handles: list[ChunkHandle], progress: bool) -> None:
        """Compute ``handles`` several per forward (``batch_compute.py``), ``batch_tokens`` rows at most each."""
        fwd = self.forward.with_backend(self.backend)
        p = len(self.prefix_ids)
        groups = batches([p + len(h.context_ids) + h.n_tokens for h in handles], self.batch_tokens)
        bar = None
        if progress and handles:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(handles), desc="precompute KV", unit="chunk")
        for group in groups:
            with torch.inference_mode():
                chunks = [handles[i].token_ids for i in group]
                kvs = compute_batch(fwd, self.prefix_ids, chunks, [handles[i].context_ids for i in group])
            for i, kv in zip(group, kvs):
                self.store.put(handles[i].key, kv)
            self.metrics.add(precomputed_chunks=len(group))
            if bar is not None:
                bar.update(len(group))
        if bar is not None:
            bar.close()

    def compute(
        self, token_ids: Sequence[int], fwd: ModelForward | None = None, context_ids: Sequence[int] = ()
    ) -> ChunkKV:
        """KV of ``prefix_ids + context_ids + token_ids``, prefix and context rows dropped, keys before RoPE; on
        ``fwd``'s kernels (a request's), else on those of ``backend``."""
        fwd = fwd if fwd is not None else self.forward.with_backend(self.backend)
        ids = self.prefix_ids + list(context_ids) + list(token_ids)
        p = len(self.prefix_ids) + len(context_ids)
        ids_tensor = torch.tensor(ids, dtype=torch.long, device=fwd.device)
        plan = PrefillPlan(ids=ids_tensor, capture=(p, len(ids)), need_logits=False)
        with torch.inference_mode():
            return prefill(fwd, plan, KVCache.for_model(fwd, len(ids))).captured

    def compute_missing(self, handle: ChunkHandle, fwd: ModelForward | None = None) -> ChunkKV:
        """Compute and store a chunk the store lacks (on ``fwd``, see ``compute``); concurrent misses on one chunk
        share one computation."""
        with self._computing_lock:
            pending = self._computing.get(handle.key)
            if pending is None:
                mine = self._computing[handle.key] = Future()
        if pending is not None:
            return pending.result()
        try:
            self.metrics.add(computed_on_miss=1)
            kv = self.store.put(handle.key, self.compute(handle.token_ids, fwd, handle.context_ids))
            mine.set_result(kv)
            return kv
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._computing_lock:
                del self._computing[handle.key]

    # ---- reading ------------------------------------------------------------------------------------------
    def get(self, handle: ChunkHandle) -> tuple[ChunkKV, bool]:
        """The stored KV of a chunk (read in full), computing and storing it on a miss. Returns (kv, was_hit)."""
        kv = self.store.get(handle.key, handle.n_tokens)
        if kv is not None:
            return kv, True
        return self.compute_missing(handle), False

    def head_seen(self, key: str) -> bool:
        """Whether a prompt head (the text before a prompt's first chunk) with store key ``key`` came in a recent
        request already; remembers it. A head is stored from its second request on, so an app whose heads never
        repeat (a question put before the passages) writes nothing per request and evicts no chunk for it."""
        with self._heads_lock:
            seen = key in self._heads_seen
            self._heads_seen[key] = None
            self._heads_seen.move_to_end(key)
            if len(self._heads_seen) > HEADS_REMEMBERED:
                self._heads_seen.popitem(last=False)
        return seen


class KVRows:
    """Rows ``offset`` .. ``offset + n - 1`` of a block that arrives layer by layer (a LazyChunk): what the prefill
    reads of a chunk found without its edge whitespace (``n_tokens``, ``layer`` as a ChunkKV has them)."""

    def __init__(self, kv: LazyChunk, offset: int, n: int) -> None:
        self.kv, self.offset, self.n = kv, offset, n

    @property
    def n_tokens(self) -> int:
        return self.n

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv.layer(index)  # [Hkv, T, D] each
        return k[:, self.offset : self.offset + self.n], v[:, self.offset : self.offset + self.n]


def kv_rows(kv: ChunkKV | LazyChunk, offset: int, n: int) -> ChunkKV | LazyChunk | KVRows:
    """Rows ``offset`` .. ``offset + n - 1`` of a block's KV ([L, Hkv, T, D]; a view, nothing copied)."""
    if offset == 0 and n == kv.n_tokens:
        return kv
    if offset < 0 or offset + n > kv.n_tokens:
        raise ValueError(f"rows {offset}..{offset + n - 1} are not in a block of {kv.n_tokens} tokens")
    if isinstance(kv, ChunkKV):
        return ChunkKV(kv.k[:, :, offset : offset + n], kv.v[:, :, offset : offset + n])
    return KVRows(kv, offset, n)


def context_texts(texts: list[str], context: Sequence[Sequence[str]] | int | None) -> list[list[str]]:
    """The context texts of each of ``texts``, checked: none (None), the k texts before it (an int k, cyclic, nearest
    last: how ``attach`` and ``chunk_contexts`` read a list of passages retrieved together) or the list given."""
    if context is None:
        return [[] for _ in texts]
    if isinstance(context, int):
        if isinstance(context, bool) or context < 0:
            raise ValueError(f"context=k takes a number of previous texts k >= 0, got {context!r}")
        k = min(context, len(texts) - 1)
        return [[texts[(i - j) % len(texts)] for j in range(k, 0, -1)] for i in range(len(texts))]
    if isinstance(context, str) or not isinstance(context, Sequence):
        raise ValueError(
            f"context must be None, an int k or one list of context texts per text, got {type(context).__name__}"
        )
    if len(context) != len(texts):
        raise ValueError(
            f"context has {len(context)} lists for {len(texts)} texts; give one list of context texts per text "
            "([] for a text computed alone)"
        )
    out = []
    for i, items in enumerate(context):
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise ValueError(f"context[{i}] is a {type(items).__name__}; give a list of texts (e.g. [neighbour])")
        for j, item in enumerate(items):
            if not isinstance(item, str):
                raise ValueError(f"context[{i}][{j}] is a {type(item).__name__}; context texts are strings")
        out.append(list(items))
    return out


def nearest_contexts(texts: list[str], k: int, tokenize) -> list[list[str]]:
    """For each of ``texts``, its ``k`` lexically nearest other texts (TF-IDF cosine over the token ids ``tokenize``
    (str -> ids) makes; ``neighbours.lexical_nearest``), least similar first, so the nearest stands right before the
    chunk. Texts with the same tokens are one text (never each other's neighbour). The weights count every text
    given, so adding texts to a call can change other texts' neighbours (and so their keys)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"context=k takes a number of neighbours k >= 0, got {k!r}")
    ids = [tuple(tokenize(t)) for t in texts]
    distinct = list(dict.fromkeys(ids))
    picked = lexical_nearest(distinct, k) if k and len(distinct) > 1 else [[] for _ in distinct]
    first = {}  # token ids -> the first text that has them (the text a neighbour is given as)
    for text, key in zip(texts, ids):
        first.setdefault(key, text)
    of = {key: [first[distinct[j]] for j in row] for key, row in zip(distinct, picked)}
    return [list(of[key]) for key in ids]


def text_tail(text: str, tokens: int, tokenize) -> str:
    """The end of ``text`` that ``tokenize`` (str -> ids) makes at most ``tokens`` tokens of, starting at a word
    where the text has whitespace there; "" if none fits."""
    start = len(text) - len(text) * tokens // max(len(tokenize(text)), 1)
    while True:
        space = WORD_START.search(text, start)
        begin = space.end() if space is not None and space.end() < len(text) else start
        n = len(tokenize(text[begin:]))
        if n <= tokens:
            return text[begin:]
        start = begin + max(1, (len(text) - begin) * (n - tokens) // n)
