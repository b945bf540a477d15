"""The strategy names the benchmarks take: a selection in brackets, a ratio of its own after '@'."""

import pytest

from cacheblend_rag.eval.ttft import strategy_config


def test_a_name_may_carry_a_selection_and_a_ratio():
    assert strategy_config("cacheblend", 0.15).recompute_ratio == 0.15
    named = strategy_config("cacheblend[deviation]@0.05", 0.15)
    assert (named.selection, named.recompute_ratio) == ("deviation", 0.05)
    assert strategy_config("cacheblend@0.1", 0.15).recompute_ratio == 0.1
    assert strategy_config("full_reuse", 0.3).strategy == "full_reuse"


def test_a_ratio_that_is_not_a_number_names_the_fix():
    with pytest.raises(ValueError, match=r"must be a number, e\.g\. cacheblend@0\.1"):
        strategy_config("cacheblend@ten", 0.15)
