"""Gold F1 on the questions full recompute answers: the quality figure the evaluation reports per configuration."""

from __future__ import annotations

import pytest

from cacheblend_rag.eval.runner import answered_quality


def row(example: int, config: str, f1: float, passages: int | None) -> dict:
    return {"example": example, "config": config, "gold_f1": f1, "gold_passages": passages}


def test_kept_counts_only_the_answered_questions_and_splits_by_passages():
    rows = [
        # example 0: one passage, answered; example 1: two passages, answered; example 2: not answered
        row(0, "full_recompute", 1.0, 1),
        row(0, "full_reuse", 0.0, 1),
        row(0, "blend", 1.0, 1),
        row(1, "full_recompute", 0.5, 2),
        row(1, "full_reuse", 0.5, 2),
        row(1, "blend", 0.25, 2),
        row(2, "full_recompute", 0.0, 1),
        row(2, "full_reuse", 1.0, 1),
        row(2, "blend", 1.0, 1),  # right where full recompute is wrong: not counted
    ]
    out = answered_quality(rows, "blend")
    assert out["answered"] == 2
    assert out["gold_f1_answered"] == pytest.approx((1.0 + 0.25) / 2)
    assert out["kept_answered"] == pytest.approx(1.25 / 1.5)
    assert out["by_passages"]["1"]["kept_answered"] == pytest.approx(1.0)
    assert out["by_passages"]["2+"]["kept_answered"] == pytest.approx(0.5)
    assert out["worse_than_reuse"] == 1  # example 1: 0.25 < full_reuse's 0.5
    assert answered_quality(rows, "full_recompute")["kept_answered"] == pytest.approx(1.0)


def test_no_gold_answers_and_no_baseline():
    rows = [row(0, "full_recompute", None, None), row(0, "blend", None, None)]
    out = answered_quality(rows, "blend")
    assert out["answered"] == 0 and out["kept_answered"] is None and out["by_passages"] == {}
    assert out["worse_than_reuse"] is None
