"""The engine's metrics and every store tier's stats are one counter type (cacheblend_rag/counters.py)."""

from __future__ import annotations

import pytest

from cacheblend_rag.counters import Counters
from cacheblend_rag.engine.stats import EngineMetrics
from cacheblend_rag.store.tier import TierStats


@pytest.mark.parametrize("cls", [EngineMetrics, TierStats])
def test_counters_start_at_zero_add_by_name_and_read_as_attributes(cls):
    assert issubclass(cls, Counters)
    counters = cls()
    assert counters.snapshot() == dict.fromkeys(cls.FIELDS, 0)
    first, second = cls.FIELDS[:2]
    counters.add(**{first: 2, second: 5})
    counters.add(**{first: 1})
    assert getattr(counters, first) == 3 and counters.snapshot()[second] == 5
    assert f"{first}=3" in repr(counters)


@pytest.mark.parametrize("cls", [EngineMetrics, TierStats])
def test_an_unknown_counter_is_an_error_that_lists_the_counters_and_adds_nothing(cls):
    counters = cls()
    with pytest.raises(AttributeError, match=rf"no counter bogus; its counters: {cls.FIELDS[0]}, "):
        counters.add(**{cls.FIELDS[0]: 1, "bogus": 1})
    assert counters.snapshot() == dict.fromkeys(cls.FIELDS, 0)  # not half an update
    with pytest.raises(AttributeError):
        counters.bogus  # noqa: B018
