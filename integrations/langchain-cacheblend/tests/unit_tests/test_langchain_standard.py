"""The langchain-tests standard unit tests for chat models, run against ChatCacheBlend on a tiny random model.

Tests the suite itself skips, and why that is right for ChatCacheBlend:
- test_init_from_env: a local model has no API key or endpoint to read from the environment.
- test_serdes: the model holds a live CacheBlendEngine (weights, KV store), which cannot be serialized;
  ``is_lc_serializable()`` is False, as for other local-model integrations.
- test_bind_tool_pydantic and test_with_structured_output return early: no tool calling
  (``has_tool_calling`` and ``has_structured_output`` are False).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from langchain_cacheblend import ChatCacheBlend

from cacheblend_rag import CacheBlendEngine

standard = pytest.importorskip(
    "langchain_tests.unit_tests",
    reason="langchain-tests is not installed: pip install -e 'integrations/langchain-cacheblend[test]'",
)


class TestChatCacheBlendStandard(standard.ChatModelUnitTests):
    tiny: ClassVar[CacheBlendEngine | None] = None

    @pytest.fixture(autouse=True)
    def _tiny_engine(self, tiny_engine: CacheBlendEngine) -> None:
        # chat_model_params is a property the suite reads directly, not a fixture; hand it the session engine
        TestChatCacheBlendStandard.tiny = tiny_engine

    @property
    def chat_model_class(self) -> type[ChatCacheBlend]:
        return ChatCacheBlend

    @property
    def chat_model_params(self) -> dict[str, Any]:
        assert self.tiny is not None
        return {"engine": self.tiny, "model": "tiny-random-llama"}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # The suite adds api_key="test" for hosted models. ChatCacheBlend runs locally, has no key, and rejects
        # unknown arguments so that a misspelt option fails instead of being ignored.
        params = super().standard_chat_model_params
        params.pop("api_key")
        return params

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True
