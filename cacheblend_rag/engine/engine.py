"""CacheBlendEngine: the public entry point. A thin shell over loading, the store, planning and decoding."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import torch

from ..config import BlendConfig
from ..kernels import resolve_backend
from ..model.forward import ModelForward
from ..model.loading import default_cache_dir, load_model
from ..store import ChunkHandle, ChunkKV, DiskTier, KVStore, MemoryTier, chain_key, model_fingerprint, tier_from_url
from ..store.pipeline import LazyChunk
from .decode import Sampler, TextStreamer, normalize_stop
from .kv_cache import KVCache
from .planner import Planner
from .prefill import PrefillPlan, prefill
from .query_selection import select_by_query
from .registry import MIN_TOKENS, ChunkRegistry
from .request import GenerationResult, GenerationStream, PreparedRequest
from .segments import Block, merge_text, place
from .selection import Budget
from .stats import EngineMetrics, RequestStats

logger = logging.getLogger(__name__)

StoreSpec = KVStore | Sequence[object] | None


class CacheBlendEngine:
    """Generates from prompts whose chunks reuse precomputed KV caches.

    model, tokenizer: a Hugging Face Llama / Mistral / Qwen2 causal LM and its tokenizer.
    store: None (memory tier of ``memory_bytes`` in front of a disk tier under ``cache_dir/kv``), a
        KVStore, or a list of tiers / tier URLs (``memory://?max_bytes=2GB``, ``file:///path``,
        ``redis://host:6379/0``), fastest first.
    store_dtype: dtype of stored KV; "auto": the compute dtype when it is 16-bit (no conversion when a chunk
        is loaded), else float16.
    chunk_prefix: text every chunk is computed after; default: the chat template's start (system prompt and
        user header), else the tokenizer's BOS if it adds one, else a newline.
    config: the default BlendConfig of ``generate``.
    registry_size, registry_min_tokens: how many chunk texts ``generate(prompt=...)`` looks for, and the fewest
        tokens a text needs to be looked for (shorter ones are not worth reusing; see engine/registry.py).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        store: StoreSpec = None,
        cache_dir: str | os.PathLike | None = None,
        memory_bytes: int = 2 << 30,
        store_dtype: torch.dtype | str = "auto",
        chunk_prefix: str | None = None,
        config: BlendConfig | None = None,
        registry_size: int = 50_000,
        registry_min_tokens: int = MIN_TOKENS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.forward = ModelForward(model)
        self.device = self.forward.device
        self.dtype = self.forward.dtype
        self.default_config = config or BlendConfig()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.fingerprint = model_fingerprint(model, tokenizer, extra=f"compute={self.dtype}")
        self.bos_ids = self._added_prefix()
        self.chunk_prefix_ids = self._chunk_prefix_ids(chunk_prefix)
        self.prefix_key = chain_key(self.fingerprint, None, self.chunk_prefix_ids)
        self.eos_token_ids = self._eos_ids()
        fwd = self.forward
        expect = (fwd.n_layers, fwd.n_kv_heads, fwd.head_dim)
        if store_dtype == "auto":
            store_dtype = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else torch.float16
        self.store = self._build_store(store, memory_bytes, store_dtype, expect)
        self.registry = ChunkRegistry(registry_size, registry_min_tokens)
        self._metrics = EngineMetrics()
        self._planner = Planner(self)
        self._prefix_lock = threading.Lock()
        self._computing: dict[str, Future] = {}  # chunk key -> its computation in progress (one per key)
        self._computing_lock = threading.Lock()
        limits = [x for x in (fwd.max_positions, fwd.sliding_window) if x]
        self.context_window = min(limits) if limits else 1 << 20

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "smollm2-135m",
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        cache_dir: str | os.PathLike | None = None,
        **kwargs,
    ) -> CacheBlendEngine:
        """Load ``smollm2-135m``, a .gguf file, a model folder or a Hugging Face id (local cache first)."""
        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype, cache_dir=cache_dir)
        engine = cls(model, tokenizer, cache_dir=cache_dir, **kwargs)
        engine.name = str(name_or_path)
        return engine

    name = "custom"

    def _build_store(self, store: StoreSpec, memory_bytes: int, dtype: torch.dtype, expect) -> KVStore:
        if isinstance(store, KVStore):
            store.expect = store.expect or expect
            return store
        if store is None:
            tiers = [MemoryTier(memory_bytes), DiskTier(self.cache_dir / "kv", self.fingerprint)]
        elif isinstance(store, (str, bytes)):
            raise TypeError("store must be a list of tier URLs or tiers, e.g. store=['memory://?max_bytes=2GB']")
        else:
            tiers = [tier_from_url(t, self.fingerprint) if isinstance(t, str) else t for t in store]
        return KVStore(tiers, dtype=dtype, expect=expect)

    def _chunk_prefix_ids(self, chunk_prefix: str | None) -> list[int]:
        """What chunks are computed after: how the prompts they will be reused in begin (APE's shared prefix).

        Default: the chat template's text before a user message (system prompt included), else the tokens the
        tokenizer puts before a prompt (e.g. BOS), else a newline. Never a token prompts do not start with: Qwen
        reads a chunk computed after its ``<|endoftext|>`` (its nominal BOS) so differently that reusing it
        alone changes answers (docs/BENCHMARKS.md).
        """
        if chunk_prefix is not None:
            ids = self.tokenize(chunk_prefix)
            if not ids:
                raise ValueError(f"chunk_prefix {chunk_prefix!r} has no tokens; pass a non-empty text or None")
            return ids
        try:
            header = self.chat_segments([])[0] if getattr(self.tokenizer, "chat_template", None) else ""
        except Exception as exc:  # a template that needs more than one user message: fall back
            logger.debug("no chat header for the chunk prefix (%s)", exc)
            header = ""
        if header:
            return self.tokenize(header)
        return list(self.bos_ids) or self.tokenize("\n")

    def _added_prefix(self) -> list[int]:
        """Special tokens the tokenizer puts before a prompt (e.g. Llama's BOS); prepended to every request."""
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("x")["input_ids"]
        if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
            return list(full[: len(full) - len(plain)])
        return []

    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        if extra is not None:
            ids.update(int(x) for x in (extra if isinstance(extra, (list, tuple)) else [extra]))
        return frozenset(ids)

    # ---- chunks -------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, without special tokens added."""
        if not isinstance(text, str):
            raise TypeError(f"expected text (str), got {type(text).__name__}")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def handle(self, text: str) -> ChunkHandle:
        """The handle a chunk text would have (computes nothing)."""
        ids = self.tokenize(text)
        return ChunkHandle(chain_key(self.fingerprint, self.prefix_key, ids), text, tuple(ids), self.fingerprint)

    def precompute(self, texts: Iterable[str], progress: bool = False, register: bool = True) -> list[ChunkHandle]:
        """Compute and store the KV of every chunk not already stored; return one handle per text."""
        if isinstance(texts, str):
            raise TypeError("precompute takes a list of texts; wrap a single text: precompute([text])")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}; precompute takes strings")
        handles = [self.handle(t) for t in texts]
        limit = self.context_window - len(self.chunk_prefix_ids)
        for i, handle in enumerate(handles):
            if not handle.token_ids:
                raise ValueError(f"texts[{i}] has no tokens (empty text); drop it before precompute")
            if handle.n_tokens > limit:
                raise ValueError(
                    f"texts[{i}] has {handle.n_tokens} tokens, more than a chunk can have in the model's "
                    f"context window ({limit} of {self.context_window}); split it into smaller chunks"
                )
        todo = {h.key: h for h in handles if not self.store.contains(h.key)}
        self._metrics.add(precompute_cache_hits=len(handles) - len(todo))
        items = todo.values()
        if progress and todo:
            from tqdm.auto import tqdm

            items = tqdm(items, total=len(todo), desc="precompute KV", unit="chunk")
        for handle in items:
            self.store.put(handle.key, self.compute_chunk(handle.token_ids))
            self._metrics.add(precomputed_chunks=1)
        if register:
            for handle in handles:
                self.registry.register(handle)
        return handles

    def register(self, handles: Iterable[ChunkHandle]) -> None:
        """Make ``generate(prompt=...)`` recognise these chunks' texts (those under ``registry.min_tokens``
        tokens are skipped: too short to be worth reusing)."""
        handles = list(handles)
        for handle in handles:
            self._check_handle(handle)
            if self.registry.lookup(handle.text) != handle and self.tokenize(handle.text) != list(handle.token_ids):
                raise ValueError(
                    f"handle {handle.key[:12]}...: its text does not tokenize to its token ids; "
                    "use the handles engine.precompute returns"
                )
        for handle in handles:
            self.registry.register(handle)

    def compute_chunk(self, token_ids: Sequence[int]) -> ChunkKV:
        """KV of ``chunk_prefix + token_ids`` computed alone, prefix rows dropped, keys before RoPE."""
        ids = self.chunk_prefix_ids + list(token_ids)
        p = len(self.chunk_prefix_ids)
        plan = PrefillPlan(ids=self._ids_tensor(ids), capture=(p, len(ids)), need_logits=False)
        cache = self._new_cache(len(ids))
        with torch.inference_mode():
            result = prefill(self.forward, plan, cache, backend=self.default_config.backend)
        return result.captured

    def _check_handle(self, handle: object) -> ChunkHandle:
        if not isinstance(handle, ChunkHandle):
            raise TypeError(f"expected a ChunkHandle from engine.precompute, got {type(handle).__name__}")
        if handle.model_fingerprint != self.fingerprint:
            raise ValueError(
                f"unknown handle {handle.key[:12]}...: it was made by another model or tokenizer; "
                "call engine.precompute([...]) on this engine to get handles for it"
            )
        if chain_key(self.fingerprint, self.prefix_key, handle.token_ids) != handle.key:
            raise ValueError(
                f"unknown handle {handle.key[:12]}...: its key does not match its tokens; "
                "use the handles engine.precompute returns"
            )
        return handle

    def chunk_kv(self, handle: ChunkHandle) -> tuple[ChunkKV, bool]:
        """The stored KV of a chunk (read in full), computing and storing it on a miss. Returns (kv, was_hit)."""
        kv = self.store.get(handle.key, handle.n_tokens)
        if kv is not None:
            return kv, True
        return self._compute_missing(handle), False

    def chunk_sources(
        self, handles: Sequence[ChunkHandle], stats: RequestStats | None = None
    ) -> list[tuple[ChunkKV | LazyChunk, bool]]:
        """The KV of a request's chunks for the prefill, as (kv, was_hit) per handle.

        A chunk in the memory tier is a ChunkKV; one in a slow tier (disk, Redis) is a LazyChunk whose layers
        a background thread reads while the prefill computes the layers before; a miss is computed and stored
        here. A LazyChunk whose read fails is recomputed when the prefill reaches it, and counted as a miss
        in ``stats`` and in ``computed_on_miss``.
        """
        found = self.store.fetch([h.key for h in handles], [h.n_tokens for h in handles])
        out: list[tuple[ChunkKV | LazyChunk, bool]] = []
        for handle, kv in zip(handles, found):
            if kv is None:
                out.append((self._compute_missing(handle), False))
                continue
            if isinstance(kv, LazyChunk) and kv.fallback is None:
                kv.fallback = partial(self._compute_missing, handle)
                kv.on_fallback = partial(self._count_fallback, stats)
            out.append((kv, True))
        return out

    def _count_fallback(self, stats: RequestStats | None) -> None:
        if stats is not None:
            stats.cache_hits -= 1
            stats.cache_misses += 1

    def _compute_missing(self, handle: ChunkHandle) -> ChunkKV:
        """Compute and store a chunk the store lacks; concurrent misses on one chunk share one computation."""
        with self._computing_lock:
            pending = self._computing.get(handle.key)
            if pending is None:
                mine = self._computing[handle.key] = Future()
        if pending is not None:
            return pending.result()
        try:
            self._metrics.add(computed_on_miss=1)
            kv = self.store.put(handle.key, self.compute_chunk(handle.token_ids))
            mine.set_result(kv)
            return kv
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._computing_lock:
                del self._computing[handle.key]

    # ---- requests -----------------------------------------------------------------------------------
    def chat_segments(self, segments: Sequence[str | ChunkHandle] | str, system: str | None = None) -> list:
        """Wrap segments in the model's chat template as one user message, chunk texts unchanged."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("this tokenizer has no chat template; pass segments to generate() directly")
        sentinel = "\u2063CACHEBLEND-SEGMENTS\u2063"
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": sentinel})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(sentinel) != 1:
            raise ValueError("the chat template changes the message text; build the prompt segments yourself")
        before, after = text.split(sentinel)
        return [before, *merge_text(segments), after]

    def format_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string for chat ``messages`` ([{"role": ..., "content": ...}]) in the model's template.

        Chunk texts inside message contents stay verbatim, so ``generate(prompt=...)`` finds and reuses them.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; format the prompt yourself and pass prompt=...")
        if not messages:
            raise ValueError("messages is empty: pass at least one {'role': ..., 'content': ...} message")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and str 'content', got {message!r}")
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def blocks(self, segments: Sequence[str | ChunkHandle] | None, prompt: str | None) -> list[Block]:
        """Token blocks of a request, given segments or a prompt string (split at registered chunk texts)."""
        if (segments is None) == (prompt is None):
            raise ValueError("pass either segments or prompt=..., not both or neither")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            # the prompt's own tokens; runs equal to a registered chunk's tokens reuse its KV (engine/registry.py)
            segments = self.registry.split(self.tokenize(prompt))
        else:
            segments = merge_text(segments)
        blocks = []
        for seg in segments:
            if isinstance(seg, str):
                blocks.append(Block(self.tokenize(seg)))
            elif isinstance(seg, list):
                blocks.append(Block(seg))
            else:
                blocks.append(Block(list(self._check_handle(seg).token_ids), seg))
        blocks = [b for b in blocks if b.token_ids]
        first = blocks[0].token_ids if blocks else []
        if self.bos_ids and first[: len(self.bos_ids)] != self.bos_ids:
            blocks.insert(0, Block(list(self.bos_ids)))
        n = place(blocks)
        if not any(b.handle is not None or b.token_ids != self.bos_ids for b in blocks):
            raise ValueError("the prompt is empty: give at least one non-empty text segment or chunk")
        if n > self.context_window:
            raise ValueError(
                f"the prompt has {n} tokens but the model's context window is {self.context_window}; "
                "retrieve fewer or shorter chunks, or shorten the prompt"
            )
        return blocks

    def prepare(
        self,
        segments: Sequence[str | ChunkHandle] | None = None,
        *,
        prompt: str | None = None,
        config: BlendConfig | None = None,
        extra_capacity: int = 0,
    ) -> PreparedRequest:
        """Run the prefill of a request under ``config``; returns the cache and first-token logits."""
        started = time.perf_counter()
        config = self._config(config)
        blocks = self.blocks(segments, prompt)
        n = blocks[-1].end
        stats = RequestStats(strategy=config.strategy, prompt_tokens=n)
        plan, store_blocks = self._planner.plan(blocks, config, stats)
        # never more rows than the context window lets the request decode into (a huge max_new_tokens)
        cache = self._new_cache(n + max(0, min(extra_capacity, max(self.context_window - n, 1))))
        t = time.perf_counter()
        with torch.inference_mode():
            if config.strategy == "cacheblend" and config.selection == "query" and plan.spans:
                plan, _, probe_flops = select_by_query(
                    self.forward, plan, cache, Budget.of(config), backend=config.backend
                )
                stats.probe_s = time.perf_counter() - t
                stats.prefill_flops += probe_flops
            result = prefill(self.forward, plan, cache, backend=config.backend)
        stats.prefill_s = time.perf_counter() - t
        if config.strategy == "cacheblend" and stats.cached_tokens:
            cached_rows = sum(int(((result.rows >= s.start) & (result.rows < s.end)).sum()) for s in plan.spans)
            stats.recompute_ratio = cached_rows / stats.cached_tokens
        stats.recomputed_tokens = int(result.rows.shape[0])
        stats.reused_tokens = n - stats.recomputed_tokens
        stats.layer_rows = result.layer_rows
        stats.prefill_flops += result.flops
        if store_blocks:
            self._planner.store_prefix_blocks(store_blocks, result.captured)
        prompt_ids = [t for b in blocks for t in b.token_ids]
        return PreparedRequest(cache, result.logits, stats, prompt_ids, started)

    def stream(
        self,
        segments: Sequence[str | ChunkHandle] | None = None,
        *,
        prompt: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        config: BlendConfig | None = None,
    ) -> GenerationStream:
        """Like ``generate`` but returns an iterator of text pieces; its ``.result`` has the full result."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        sampler = Sampler(temperature, top_p, seed)
        streamer = TextStreamer(self.tokenizer, normalize_stop(stop))
        config = self._config(config)
        request = self.prepare(segments, prompt=prompt, config=config, extra_capacity=max_new_tokens)
        room = self.context_window - request.stats.prompt_tokens
        return GenerationStream(
            self, request, sampler, streamer, min(max_new_tokens, max(room, 1)), config.backend, self._metrics.record
        )

    def generate(
        self,
        segments: Sequence[str | ChunkHandle] | None = None,
        *,
        prompt: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        config: BlendConfig | None = None,
    ) -> GenerationResult:
        """Generate from segments (str = compute, ChunkHandle = reuse) or from a prompt string.

        Greedy when ``temperature`` is 0. Stops at EOS, at the first ``stop`` string (cut from the text),
        or after ``max_new_tokens``.
        """
        return self.stream(
            segments,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            config=config,
        ).result

    def metrics(self) -> dict:
        """Cumulative counters: requests, tokens, cache hits/misses, and per-tier store counters."""
        out: dict = self._metrics.snapshot()
        out["store"] = self.store.stats()
        out["registered_chunks"] = len(self.registry)
        return out

    # ---- helpers ------------------------------------------------------------------------------------
    def _config(self, config: BlendConfig | None) -> BlendConfig:
        config = config or self.default_config
        if not isinstance(config, BlendConfig):
            raise TypeError(f"config must be a BlendConfig, got {type(config).__name__}")
        too_deep = [layer for layer in config.check_layers if layer >= self.forward.n_layers]
        if config.strategy == "cacheblend" and too_deep:
            raise ValueError(f"check_layers {too_deep} do not exist: the model has {self.forward.n_layers} layers")
        resolve_backend(config.backend, self.device)  # fails early, with the fix, if Triton cannot run here
        return config

    def _ids_tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long, device=self.device)

    def _new_cache(self, capacity: int) -> KVCache:
        fwd = self.forward
        return KVCache(fwd.n_layers, fwd.n_kv_heads, fwd.head_dim, capacity, self.dtype, self.device)

    def __repr__(self) -> str:
        return (
            f"CacheBlendEngine(model={self.name!r}, device={self.device}, dtype={self.dtype}, "
            f"layers={self.forward.n_layers})"
        )
