"""Fields and helpers shared by ChatCacheBlend and CacheBlendLLM: the engine, sampling and blend options."""

from __future__ import annotations

import json
import threading
from typing import Any

from langchain_core.language_models import LangSmithParams
from langchain_core.messages.ai import UsageMetadata
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_serializer, model_validator

from cacheblend_rag import BlendConfig, CacheBlendEngine, GenerationResult, SamplingParams
from cacheblend_rag.store.urls import redact_secrets

from ._generation import Generation, Options

DEFAULT_MODEL = "smollm2-135m"
PROVIDER = "cacheblend"

# Per-call keyword arguments (``invoke(..., temperature=0.7)`` or ``.bind(...)``) and the field each overrides.
CALL_OPTIONS = ("temperature", "max_tokens", "top_p", "seed", "timeout", "strategy", "recompute_ratio", "blend_config")

_engines: dict[str, CacheBlendEngine] = {}
_engines_lock = threading.Lock()


def load_engine(model: str, engine_kwargs: dict[str, Any]) -> CacheBlendEngine:
    """``CacheBlendEngine.from_pretrained(model, **engine_kwargs)``, loaded once per process for each arguments.

    Sharing matters beyond load time: a CacheBlendRetriever registers chunk texts with one engine, and only
    a model using that same engine finds them in its prompts.
    """
    key = json.dumps([model, engine_kwargs], sort_keys=True, default=repr)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = CacheBlendEngine.from_pretrained(model, **engine_kwargs)
            _engines[key] = engine
        return engine


class CacheBlendParams(BaseModel):
    """The engine and the generation options common to the chat model and the LLM."""

    # hide_input_in_errors: a validation error must not echo engine_kwargs (store URLs may hold passwords)
    model_config = ConfigDict(
        populate_by_name=True, arbitrary_types_allowed=True, extra="forbid", hide_input_in_errors=True
    )

    engine: CacheBlendEngine | None = Field(default=None, exclude=True, repr=False)
    """The engine to generate with. Share it with CacheBlendRetriever so retrieved chunks are reused. If not
    given, ``model`` is loaded (once per process for the same ``model`` and ``engine_kwargs``)."""
    model_name: str | None = Field(default=None, alias="model")
    """Model to load when ``engine`` is not given (``smollm2-135m``, a .gguf file, a folder or a Hugging Face
    id); with ``engine``, the name reported in traces (default: the engine's name)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of ``CacheBlendEngine.from_pretrained`` (device, dtype, store, cache_dir, ...). Shown
    (repr, serialization, traces) with the passwords of store URLs replaced by ``***``."""
    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature; 0 is greedy."""
    max_tokens: int = Field(default=256, ge=1)
    """Maximum number of tokens to generate."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of the sampler (used when temperature > 0)."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop strings: generation ends at the first one, which is cut from the text. A per-call ``stop``
    replaces these."""
    timeout: float | None = Field(default=None, gt=0.0)
    """Seconds one request may take (checked between tokens); None is no limit."""
    max_retries: int = Field(default=2, ge=0)
    """Retries of a prefill that ran out of accelerator memory. A local model has no other transient errors."""
    strategy: str | None = None
    """Blend strategy: ``cacheblend`` (default), ``full_reuse``, ``prefix_cache`` or ``full_recompute``."""
    recompute_ratio: float | None = None
    """Fraction of the reused tokens cacheblend recomputes (default 0.15)."""
    blend_config: BlendConfig | None = None
    """A full BlendConfig (check layers, deviation, ...); ``strategy`` and ``recompute_ratio`` override it.
    Default: the engine's default config."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (token callbacks fire for every piece)."""

    _blend: BlendConfig = PrivateAttr()

    def __repr_args__(self):
        return [(k, redact_secrets(v) if k == "engine_kwargs" else v) for k, v in super().__repr_args__()]

    @field_serializer("engine_kwargs")
    def _redacted_engine_kwargs(self, value: dict[str, Any]) -> dict[str, Any]:
        return redact_secrets(value)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """LangSmith's tracing parameters (the LangChain base class's), with our provider and default stop."""
        params = super()._get_ls_params(stop=stop, **kwargs)  # type: ignore[misc]
        params["ls_provider"] = PROVIDER
        if stop is None and self.stop:
            params["ls_stop"] = list(self.stop)
        return params

    @model_validator(mode="after")
    def _resolve_engine(self) -> CacheBlendParams:
        if self.engine is None:
            self.engine = load_engine(self.model_name or DEFAULT_MODEL, self.engine_kwargs)
        elif self.engine_kwargs:
            raise ValueError(
                "engine_kwargs only apply when the model loads its own engine; configure the engine you pass "
                "(CacheBlendEngine.from_pretrained(..., **kwargs)) or drop engine="
            )
        if self.model_name is None:
            self.model_name = getattr(self.engine, "name", None) or DEFAULT_MODEL
        self._blend = self._blend_config(self.strategy, self.recompute_ratio, self.blend_config)
        return self

    @property
    def _engine(self) -> CacheBlendEngine:
        assert self.engine is not None  # set by the validator
        return self.engine

    def _blend_config(self, strategy: Any, ratio: Any, config: Any) -> BlendConfig:
        base = config if config is not None else self._engine.default_config
        if not isinstance(base, BlendConfig):
            raise TypeError(f"blend_config must be a cacheblend_rag.BlendConfig, got {type(base).__name__}")
        changes = {k: v for k, v in (("strategy", strategy), ("recompute_ratio", ratio)) if v is not None}
        return base.replace(**changes) if changes else base

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> Options:
        """Instance defaults with the per-call overrides in ``kwargs`` applied (unknown ones are an error)."""
        kwargs = dict(kwargs)
        kwargs.pop("stream", None)  # BaseChatModel's own switch between _generate and _stream
        model = kwargs.pop("model", None)
        if model is not None and model != self.model_name:
            raise ValueError(
                f"this {type(self).__name__} serves {self.model_name!r} and cannot switch to model={model!r} per "
                "call; create another instance for that model"
            )
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
        if unknown:
            raise TypeError(
                f"unsupported keyword argument(s) {unknown} for {type(self).__name__}; per-call options are "
                f"{', '.join(CALL_OPTIONS)} and stop"
            )
        blend = self._blend
        if any(k in kwargs for k in ("strategy", "recompute_ratio", "blend_config")):
            blend = self._blend_config(
                kwargs.get("strategy", self.strategy),
                kwargs.get("recompute_ratio", self.recompute_ratio),
                kwargs.get("blend_config", self.blend_config),
            )
        timeout = kwargs.get("timeout", self.timeout)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be a number of seconds > 0, or None for no limit; got {timeout!r}")
        stop = stop if stop is not None else self.stop
        sampling = SamplingParams(
            max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            seed=kwargs.get("seed", self.seed),
            stop=stop or None,
        )
        return Options(sampling=sampling, config=blend, timeout=timeout, max_retries=self.max_retries)

    def _generation(
        self, prompt: str | list[dict[str, str]], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Generation:
        """One request: a prompt string, or chat messages (``[{"role", "content"}]``, each content read as text)."""
        return Generation(self._engine, prompt, self._options(stop, kwargs))

    @property
    def _identifying_params(self) -> dict[str, Any]:
        blend = self._blend
        return {
            "model_name": self.model_name,
            "model_fingerprint": self._engine.fingerprint[:16],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "strategy": blend.strategy,
            "recompute_ratio": blend.recompute_ratio,
            "selection": blend.selection,
            "check_layers": list(blend.check_layers) if blend.check_layers is not None else None,
            "deviation": blend.deviation,
            "recompute_chunk_head": blend.recompute_chunk_head,
        }

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the model's own tokenizer."""
        return self._engine.tokenize(text)

    def _response_metadata(self, result: GenerationResult) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_provider": PROVIDER,
            "finish_reason": finish_reason(result),
            "cacheblend": result.stats.as_dict(),
        }


def usage_metadata(result: GenerationResult) -> UsageMetadata:
    """Token counts of one request; the prompt tokens whose KV was reused count as cache reads."""
    stats = result.stats
    return UsageMetadata(
        input_tokens=stats.prompt_tokens,
        output_tokens=stats.new_tokens,
        total_tokens=stats.prompt_tokens + stats.new_tokens,
        input_token_details={"cache_read": stats.reused_tokens},
    )


def finish_reason(result: GenerationResult) -> str:
    """OpenAI-style finish reason: ``stop`` (end of turn or a stop string) or ``length``."""
    return "length" if result.finish_reason == "length" else "stop"
