"""CacheBlendEngine: the public entry point, a few methods over the prompt format, the chunk source, the
strategies, the prefill and decoding.

A request goes one way: segments, a prompt string or chat messages -> token runs (``runs.py``; chunk texts found by
the registry of the request's scope) -> its strategy's plan (``strategies/``: where chunks may be reused, their KV
read through ``chunk_reads.py``, a miss computed, a selection's probe pass) -> the prefill (``prefill.py``, driven
by ``prepare.py``) -> the strategy's finish -> decoding (``generation.py``).

Registry scopes: ``scope=`` (a str; None is the default scope) names whose chunks a request may reuse. Chunks
registered in a scope are found only in that scope's prompts, and their stored KV is salted with it
(``store/keys.py``), so a scope learns nothing about another's chunks. A server maps each API key to a scope.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path

import torch

from ..config import BlendConfig
from ..model.forward import ModelForward
from ..model.loading import default_cache_dir, load_model
from ..store import ChunkHandle, ChunkKV, model_fingerprint
from ..store.keys import check_scope
from .batch_generate import generate_batch
from .chunk_keys import ChunkKeys
from .chunk_reads import RequestChunks
from .chunk_source import ChunkSource, context_texts
from .generation import GenerationResult, GenerationStream
from .kv_cache import KVCache
from .prefill import run_to_end
from .prepare import PreparedRequest, run_strategy_steps
from .prompt import PromptFormat
from .registry import MIN_TOKENS, ChunkRegistry
from .runs import check_runs, token_runs
from .sampling import Sampler, SamplingParams
from .segments import TokenRun
from .stats import EngineMetrics
from .store_setup import StoreSpec, build_store
from .strategies import strategy_for
from .text_stream import TextStreamer

logger = logging.getLogger(__name__)


class CacheBlendEngine:
    """Generates from prompts whose chunks reuse precomputed KV caches.

    model, tokenizer: a Hugging Face Llama / Mistral / Qwen2 causal LM and its tokenizer.
    store: None (memory tier of ``memory_bytes`` in front of a disk tier under ``cache_dir/kv``; on CUDA a
        device tier and a pinned host tier of ``memory_bytes`` in front of the disk: docs/GPU.md), a
        KVStore, or a list of tiers / tier URLs (``memory://?max_bytes=2GB``, ``file:///path``,
        ``redis://host:6379/0``), fastest first.
    store_dtype: dtype of stored KV; "auto": the compute dtype when it is 16-bit (no conversion when a chunk
        is loaded), else float16.
    chunk_prefix: text every chunk is computed after; default: the chat template's start (system prompt and
        user header), else the tokenizer's BOS if it adds one, else a newline.
    system_prompt: the system prompt the app's chat prompts carry: chunks are then computed after the template's
        start with it instead of the template's default (reused in exactly the context they were computed in;
        docs/DESIGN.md, "Where a chunk may be reused"). Not with ``chunk_prefix``.
    config: the default BlendConfig of ``generate``.
    registry_size, registry_min_tokens: how many chunk texts ``generate(prompt=...)`` looks for (per scope), and
        the fewest tokens a text needs to be looked for (shorter ones are not worth reusing; engine/registry.py).
    max_scopes: how many registry scopes besides the default one are kept (the least recently used is forgotten:
        its texts are no longer looked for, its stored KV stays in the store).
    cuda_graphs: on CUDA, decode each request through a CUDA graph of one step (captured after the prefill,
        replayed per token; engine/decode.py). If a capture fails, the engine logs it once and decodes eagerly.
    """

    name = "custom"

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
        system_prompt: str | None = None,
        config: BlendConfig | None = None,
        registry_size: int = 50_000,
        registry_min_tokens: int = MIN_TOKENS,
        max_scopes: int = 1024,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs
        self.model_forward = fwd = ModelForward(model)
        self.device, self.dtype = fwd.device, fwd.dtype
        self.default_config = config or BlendConfig()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.fingerprint = model_fingerprint(model, tokenizer, extra=f"compute={self.dtype}")
        self.prompt_format = PromptFormat(tokenizer, getattr(model, "generation_config", None))
        self.bos_ids = self.prompt_format.bos_ids
        self.eos_token_ids = self.prompt_format.eos_ids
        prefix = self.prompt_format.chunk_prefix_ids(chunk_prefix, system_prompt)
        self.chunk_prefix_ids = self.prompt_format.chunk_prefix = prefix
        limits = [x for x in (fwd.max_positions, fwd.sliding_window) if x]
        self.context_window = min(limits) if limits else 1 << 20
        if store_dtype == "auto":
            store_dtype = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else torch.float16
        expect = (fwd.n_layers, fwd.n_kv_heads, fwd.head_dim)
        self.store = build_store(
            store, self.fingerprint, self.cache_dir, memory_bytes, store_dtype, expect, device=self.device
        )
        self.registry_size, self.registry_min_tokens, self.max_scopes = registry_size, registry_min_tokens, max_scopes
        # makes the registry of a scope when a request first names it; share_registry replaces it
        self.registry_factory: Callable[[str | None], ChunkRegistry] = self.new_registry
        self.registry = self.new_registry(None)  # the default scope's
        self._scoped: OrderedDict[str, ChunkRegistry] = OrderedDict()  # least recently used first
        self._scoped_lock = threading.Lock()
        self._metrics = EngineMetrics()
        self.chunk_source = ChunkSource(
            fwd,
            self.store,
            ChunkKeys(self.prompt_format, self.fingerprint),
            self._metrics,
            context_window=self.context_window,
            backend=self.default_config.backend,
        )

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

    # ---- chunks -------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` alone, without special tokens added."""
        return self.prompt_format.tokenize(text)

    def handle(self, text: str, *, scope: str | None = None, context_ids: Sequence[int] = ()) -> ChunkHandle:
        """The handle a chunk text would have in registry scope ``scope``, computed after ``context_ids`` (computes
        nothing)."""
        return self.chunk_source.keys.handle(text, scope, context_ids)

    def context_ids(self, context: Sequence[str]) -> tuple[int, ...]:
        """The ``context_ids`` of a chunk computed after the texts ``context`` (e.g. one of ``chunk_contexts``'s
        lists): each tokenized as a chunk is, one after another."""
        return self.chunk_source.keys.context_ids(context)

    def precompute(
        self,
        texts: Iterable[str],
        progress: bool = False,
        register: bool = True,
        *,
        scope: str | None = None,
        context: Sequence[Sequence[str]] | int | None = 2,
    ) -> list[ChunkHandle]:
        """Compute and store the KV of every chunk not already stored in registry scope ``scope``; return one handle
        per text (registered in ``scope`` for ``generate(prompt=...)`` unless ``register=False``).

        context: an int k (default 2: each text after its k lexically nearest others in ``texts``, least similar
        first: TF-IDF cosine over token ids, ``neighbours.lexical_nearest``; trimmed as ``chunk_contexts`` trims a
        context), one list of texts per text (its KV is computed after them as given, e.g. its nearest chunks in an
        index by embedding: ``chunk_contexts(texts, lists)`` trims them the same way), or 0 / None (each chunk alone
        after the chunk prefix, as the CacheBlend paper computes it). Chunks computed among other passages keep far
        more of full recompute's quality under reuse than chunks computed alone, and among their nearest passages
        more than among unrelated ones (docs/BENCHMARKS.md 1.9, 1.14): give precompute a corpus, or the passages
        that are retrieved together, in one call. The context is part of the handle's key: reuse the handles this
        returns (or pass the same texts again), not ``handle(text)`` without ``context_ids``."""
        handles = self.chunk_source.precompute(texts, progress, check_scope(scope), context)
        if register:
            registry = self.registry_for(scope)
            for handle in handles:
                registry.register(handle)
        return handles

    def attach(
        self,
        texts: Iterable[str],
        *,
        context: int = 2,
        scope: str | None = None,
        handles: Sequence[ChunkHandle | None] | None = None,
    ) -> list[ChunkHandle]:
        """Store and register the chunks of texts a retriever returned together (the passages of one prompt); one
        handle per text, its KV in the store.

        A text keeps the handle it already has: ``handles[i]`` where given (e.g. one recorded at ingestion), else the
        one registered for it in ``scope``. Any other is computed after the ``context`` texts before it in ``texts``
        (cyclic, trimmed as ``chunk_contexts`` trims them) and registered, so later
        prompts reuse that KV whatever it is retrieved with. A chunk computed among the passages it is retrieved
        with keeps far more of full recompute's quality under reuse than one computed alone (docs/BENCHMARKS.md 1.9);
        ``context=0`` computes each alone."""
        if isinstance(texts, str):
            raise TypeError("attach takes a list of texts; wrap a single text: attach([text])")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}; attach takes strings")
        given = [None] * len(texts) if handles is None else list(handles)
        if len(given) != len(texts):
            raise ValueError(f"handles has {len(given)} entries for {len(texts)} texts; give one (or None) per text")
        contexts = context_texts(texts, context)
        source, registry = self.chunk_source, self.registry_for(scope)
        for i, handle in enumerate(given):
            if handle is not None and source.keys.check(handle, scope).text != texts[i]:
                raise ValueError(f"handles[{i}] is the handle of another text than texts[{i}]")
        known = [h if h is not None else registry.lookup(t) for h, t in zip(given, texts)]
        out = list(known)
        for i in [i for i, h in enumerate(known) if h is None]:
            fitting = source.fitting_context(texts[i], contexts[i])
            out[i] = source.keys.handle(texts[i], scope, source.keys.context_ids(fitting))
        source.store_missing(out)
        for handle in out:
            registry.register(handle)  # again for a known one: the registry keeps it as recently used
        return out

    def chunk_contexts(self, texts: Sequence[str], context: Sequence[Sequence[str]] | int) -> list[list[str]]:
        """For each of ``texts``, what a chunk of it is computed after: the ``context`` texts before it (an int k,
        cyclic) or the list given for it (e.g. its nearest neighbours in an index), trimmed to at most k times
        max(the chunk's tokens, 512) tokens and to what fits the model's context window with the chunk (the texts
        nearest the chunk kept, the first that would overflow cut to its end, those before it dropped): what
        ``attach`` computes a new text after, and what ``precompute(texts, context=lists)`` takes (an int k given to
        ``precompute`` picks each text's k nearest instead: ``chunk_source.nearest_contexts``)."""
        texts = list(texts)
        source = self.chunk_source
        return [source.fitting_context(t, c) for t, c in zip(texts, context_texts(texts, context))]

    def nearest_contexts(self, texts: Sequence[str], k: int) -> list[list[str]]:
        """For each of ``texts``, what ``precompute(texts, context=k)`` computes it after: its ``k`` lexically nearest
        others in ``texts`` (TF-IDF cosine over token ids; copies of a text are one text), least similar first,
        trimmed as ``chunk_contexts`` trims a context. The weights count every text given: adding texts can change
        other texts' neighbours."""
        if isinstance(texts, str):
            raise TypeError("nearest_contexts takes a list of texts; wrap a single text: nearest_contexts([text], k)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0 (neighbours per text), got {k!r}")
        return self.chunk_source.contexts(list(texts), k)

    def register(self, handles: Iterable[ChunkHandle], *, scope: str | None = None) -> None:
        """Make ``generate(prompt=...)`` in registry scope ``scope`` recognise these chunks' texts (handles made in
        that scope; those under ``registry_min_tokens`` tokens are skipped: too short to be worth reusing)."""
        handles = list(handles)
        registry = self.registry_for(scope)
        for handle in handles:
            self.chunk_source.keys.check(handle, scope)
            if registry.lookup(handle.text) != handle and self.tokenize(handle.text) != list(handle.token_ids):
                raise ValueError(
                    f"handle {handle.key[:12]}...: its text does not tokenize to its token ids; "
                    "use the handles engine.precompute returns"
                )
        for handle in handles:
            registry.register(handle)

    def registry_options(self) -> dict:
        """The keyword arguments every registry of this engine is made with (max_entries, min_tokens, whitespace):
        a ``registry_factory`` that makes another kind of ChunkRegistry passes them on."""
        return {
            "max_entries": self.registry_size,
            "min_tokens": self.registry_min_tokens,
            "whitespace": self.prompt_format.is_whitespace,
        }

    def new_registry(self, scope: str | None = None) -> ChunkRegistry:
        """An empty ChunkRegistry with this engine's options (the default ``registry_factory``)."""
        return ChunkRegistry(**self.registry_options())

    def registry_for(self, scope: str | None) -> ChunkRegistry:
        """The chunk registry of a scope (None: ``engine.registry``), made by ``registry_factory`` the first time a
        scope is named; past ``max_scopes`` the least recently used scope's registry is forgotten."""
        if check_scope(scope) is None:
            return self.registry
        with self._scoped_lock:
            registry = self._scoped.get(scope)
            if registry is not None:
                self._scoped.move_to_end(scope)
                return registry
            registry = self._scoped[scope] = self.registry_factory(scope)
            while len(self._scoped) > self.max_scopes:
                self._scoped.popitem(last=False)
            return registry

    def compute_chunk(self, token_ids: Sequence[int], context_ids: Sequence[int] = ()) -> ChunkKV:
        """KV of ``chunk_prefix + context_ids + token_ids`` (none: the chunk alone), prefix and context rows dropped,
        keys before RoPE: what the store holds for a handle with these ``token_ids`` and ``context_ids``."""
        return self.chunk_source.compute(token_ids, context_ids=context_ids)

    def chunk_kv(self, handle: ChunkHandle) -> tuple[ChunkKV, bool]:
        """The stored KV of a chunk (read in full), computing and storing it on a miss. Returns (kv, was_hit)."""
        return self.chunk_source.get(handle)

    # ---- prompts ------------------------------------------------------------------------------------
    def chat_segments(self, segments: Sequence[str | ChunkHandle] | str, system: str | None = None) -> list:
        """Wrap segments in the model's chat template as one user message, chunk texts unchanged."""
        return self.prompt_format.chat_segments(segments, system)

    def format_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt string for chat ``messages`` ([{"role": ..., "content": ...}]) in the model's template.

        Chunk texts inside message contents stay verbatim, so ``generate(prompt=...)`` finds and reuses them.
        """
        return self.prompt_format.format_chat(messages, add_generation_prompt)

    def blocks(
        self,
        segments: Sequence[str | ChunkHandle] | None = None,
        prompt: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        scope: str | None = None,
    ) -> list[TokenRun]:
        """The token runs (``TokenRun``) of a request, given segments, a prompt string or chat ``messages``
        ([{"role", "content"}]: the chat template's text with its special tokens, each content as plain text), split
        at the chunk texts registered in ``scope``. ``prepare``, ``stream`` and ``generate`` take them back as
        ``blocks=`` (so a server can tokenize a large prompt off the engine's thread)."""
        registry = self.registry_for(scope)
        keys = self.chunk_source.keys
        return token_runs(keys, registry, segments, prompt, messages, scope=scope, context_window=self.context_window)

    # ---- requests -----------------------------------------------------------------------------------
    def prepare(self, segments: Sequence[str | ChunkHandle] | None = None, **kwargs) -> PreparedRequest:
        """Run the prefill of a request (``prepare_steps``' arguments) to its end; returns the cache and
        first-token logits."""
        return run_to_end(self.prepare_steps(segments, **kwargs))

    def prepare_steps(
        self,
        segments: Sequence[str | ChunkHandle] | None = None,
        *,
        prompt: str | None = None,
        messages: Sequence[dict] | None = None,
        blocks: list[TokenRun] | None = None,
        config: BlendConfig | None = None,
        extra_capacity: int = 0,
        scope: str | None = None,
    ) -> Generator[int, None, PreparedRequest]:
        """The prefill of a request under ``config``, a layer per step (a batching scheduler interleaves them with
        decoding): yields the rows each layer computed, returns the cache and first-token logits."""
        started = time.perf_counter()
        config = self._config(config)
        strategy = strategy_for(config)
        fwd = self.model_forward.with_backend(config.backend)  # the request's kernels, chosen once
        if blocks is None:
            blocks = self.blocks(segments, prompt, messages=messages, scope=scope)
        elif segments is not None or prompt is not None or messages is not None:
            raise ValueError("pass blocks=... alone: they already hold the prompt")
        else:
            vocab = self.model_forward.vocab_size
            blocks = check_runs(blocks, self.chunk_source.keys, scope, self.context_window, vocab)
        n = blocks[-1].end
        # never more rows than the context window lets the request decode into (a huge max_new_tokens)
        cache = self._new_cache(n + max(0, min(extra_capacity, max(self.context_window - n, 1))))
        chunks = RequestChunks(self.chunk_source, fwd, scope)
        _, result, stats = yield from run_strategy_steps(strategy, blocks, chunks, fwd, cache, self.store)
        prompt_ids = [t for b in blocks for t in b.token_ids]
        return PreparedRequest(cache, result.logits, stats, prompt_ids, started, fwd)

    def stream(
        self,
        segments: Sequence[str | ChunkHandle] | None = None,
        *,
        prompt: str | None = None,
        messages: Sequence[dict] | None = None,
        blocks: list[TokenRun] | None = None,
        config: BlendConfig | None = None,
        sampling: SamplingParams | None = None,
        scope: str | None = None,
        **options,
    ) -> GenerationStream:
        """Like ``generate`` but returns an iterator of text pieces; its ``.result`` has the full result."""
        sampling = SamplingParams.of(sampling, options)
        streamer = TextStreamer(self.tokenizer, sampling.stop)
        request = self.prepare(
            segments,
            prompt=prompt,
            messages=messages,
            blocks=blocks,
            config=config,
            extra_capacity=sampling.max_new_tokens,
            scope=scope,
        )
        room = max(self.context_window - request.stats.prompt_tokens, 1)
        max_new = min(sampling.max_new_tokens, room)
        return GenerationStream(
            request,
            Sampler(sampling),
            streamer,
            max_new,
            self.eos_token_ids,
            self._metrics.record,
            graphs=self.cuda_graphs,
            on_graph_failure=self._graph_failed,
        )

    def generate(
        self,
        segments: Sequence[str | ChunkHandle] | None = None,
        *,
        prompt: str | None = None,
        messages: Sequence[dict] | None = None,
        blocks: list[TokenRun] | None = None,
        config: BlendConfig | None = None,
        sampling: SamplingParams | None = None,
        scope: str | None = None,
        **options,
    ) -> GenerationResult:
        """Generate from segments (str = compute, ChunkHandle = reuse), a prompt string, chat ``messages``
        ([{"role": ..., "content": ...}], in the model's chat template; contents are read as plain text) or the
        ``blocks`` that ``engine.blocks(...)`` returned. Chunk texts registered in registry scope ``scope`` (None:
        the default scope) are found in the prompt string or the messages and reuse their stored KV.

        ``sampling`` (a SamplingParams) or its fields as keyword arguments (``max_new_tokens=128``,
        ``temperature=0.0``, ``top_p=1.0``, ``seed=None``, ``stop=None``; these override ``sampling``'s): greedy
        when ``temperature`` is 0; stops at EOS, at the first ``stop`` string (cut from the text), or after
        ``max_new_tokens``. ``config``: the BlendConfig (default: the engine's).
        """
        return self.stream(
            segments,
            prompt=prompt,
            messages=messages,
            blocks=blocks,
            config=config,
            sampling=sampling,
            scope=scope,
            **options,
        ).result

    def generate_batch(self, requests: Sequence[str | dict], **kwargs) -> list[GenerationResult]:
        """Generate for several requests at once: each prefilled, all decoded together in one batch (prompt strings,
        or dicts of ``generate``'s keywords; engine/batch_generate.py has the options). Results in order."""
        return generate_batch(self, requests, **kwargs)

    def metrics(self) -> dict:
        """Cumulative counters: requests, tokens, cache hits/misses, and per-tier store counters."""
        out: dict = self._metrics.snapshot()
        out["store"] = self.store.stats()
        with self._scoped_lock:
            scoped = sum(len(registry) for registry in self._scoped.values())
        out["registered_chunks"] = len(self.registry) + scoped
        return out

    # ---- helpers ------------------------------------------------------------------------------------
    def _config(self, config: BlendConfig | None) -> BlendConfig:
        config = config or self.default_config
        if not isinstance(config, BlendConfig):
            raise TypeError(f"config must be a BlendConfig, got {type(config).__name__}")
        return config

    def _graph_failed(self, exc: BaseException) -> None:
        """A CUDA graph capture failed: say so once and decode eagerly from now on."""
        if self.cuda_graphs:
            self.cuda_graphs = False
            logger.warning("CUDA graph capture failed (%s: %s); decoding eagerly from now on", type(exc).__name__, exc)

    def _new_cache(self, capacity: int) -> KVCache:
        return KVCache.for_model(self.model_forward, capacity)

    def __repr__(self) -> str:
        return (
            f"CacheBlendEngine(model={self.name!r}, device={self.device}, dtype={self.dtype}, "
            f"layers={self.model_forward.n_layers})"
        )
