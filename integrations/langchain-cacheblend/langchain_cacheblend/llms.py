"""CacheBlendLLM: the plain-text LangChain LLM (the prompt goes to the model as is, no chat template)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict

from cacheblend_rag import GenerationResult
from cacheblend_rag.engine.aio import iterate_in_thread
from cacheblend_rag.engine.batch_generate import BatchGeneration

from ._base import CacheBlendParams, usage_metadata
from ._generation import timed


class CacheBlendLLM(CacheBlendParams, LLM):
    """Text-completion LLM over a CacheBlendEngine: chunk texts registered with the engine are reused.

    Use ChatCacheBlend for instruction-tuned models (it applies the chat template); use this class when
    your prompt is already complete, e.g. a base model or a template you render yourself.

    .. code-block:: python

        llm = CacheBlendLLM(engine=engine, max_tokens=64)
        llm.invoke(f"{context}\\n\\nQuestion: {question}\\nAnswer:")

    Usage and the engine's stats are in each generation's ``generation_info``. The prompts of one call (``batch``,
    ``abatch``, ``generate``) are decoded together in one batch (``CacheBlendEngine.generate_batch``).
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, extra="forbid")

    @property
    def _llm_type(self) -> str:
        return "cacheblend"

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if len(prompts) > 1:  # decoded together in one batch
            batch, timeout = self._batch(prompts, stop, kwargs)
            for _, piece in timed(batch, timeout):
                if self.streaming and run_manager:
                    run_manager.on_llm_new_token(piece)
            return self._llm_result(batch.results)  # type: ignore[arg-type]  # errors are raised
        results = []
        for prompt in prompts:
            generation = self._generation(_check_prompt(prompt), stop, kwargs)
            for piece in generation:
                if self.streaming and run_manager:
                    run_manager.on_llm_new_token(piece)
            assert generation.result is not None
            results.append(generation.result)
        return self._llm_result(results)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if len(prompts) > 1:  # decoded together in one batch, in a worker thread
            batch, timeout = self._batch(prompts, stop, kwargs)
            async for _, piece in iterate_in_thread(lambda: timed(batch, timeout)):
                if self.streaming and run_manager:
                    await run_manager.on_llm_new_token(piece)
            return self._llm_result(batch.results)  # type: ignore[arg-type]
        results = []
        for prompt in prompts:
            generation = self._generation(_check_prompt(prompt), stop, kwargs)
            async for piece in iterate_in_thread(lambda g=generation: g):
                if self.streaming and run_manager:
                    await run_manager.on_llm_new_token(piece)
            assert generation.result is not None
            results.append(generation.result)
        return self._llm_result(results)

    def _batch(self, prompts: list[str], stop: list[str] | None, kwargs: dict) -> tuple[BatchGeneration, float | None]:
        """Several prompts of one call as one BatchGeneration (``engine.generate_batch``'s engine: each prefilled,
        all decoded together), and the call's timeout."""
        options = self._options(stop, kwargs)
        requests = [{"prompt": _check_prompt(p)} for p in prompts]
        batch = BatchGeneration(self._engine, requests, sampling=options.sampling, config=options.config)
        return batch, options.timeout

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        generation = self._generation(_check_prompt(prompt), stop, kwargs)
        for piece in generation:
            chunk = GenerationChunk(text=piece)
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        assert generation.result is not None
        yield GenerationChunk(text="", generation_info=self._generation_info(generation.result))

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        generation = self._generation(_check_prompt(prompt), stop, kwargs)
        async for piece in iterate_in_thread(lambda: generation):
            chunk = GenerationChunk(text=piece)
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        assert generation.result is not None
        yield GenerationChunk(text="", generation_info=self._generation_info(generation.result))

    def _generation_info(self, result: GenerationResult) -> dict[str, Any]:
        return {**self._response_metadata(result), "usage_metadata": dict(usage_metadata(result))}

    def _llm_result(self, results: list[GenerationResult]) -> LLMResult:
        generations = [[Generation(text=r.text, generation_info=self._generation_info(r))] for r in results]
        usages = [usage_metadata(r) for r in results]
        total = {k: sum(u[k] for u in usages) for k in ("input_tokens", "output_tokens", "total_tokens")}
        total["cache_read"] = sum(u["input_token_details"]["cache_read"] for u in usages)
        return LLMResult(generations=generations, llm_output={"model_name": self.model_name, "token_usage": total})


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"CacheBlendLLM needs a non-empty prompt string, got {prompt!r}")
    return prompt
