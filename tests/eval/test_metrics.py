"""Metric functions against hand-computed cases."""

import math

import pytest
import torch

from cacheblend_rag.eval.metrics import (
    best_over,
    exact_match,
    f1_score,
    kl_divergence,
    normalize_answer,
    rouge_l,
    top1_agreement,
)


def test_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


def test_exact_match():
    assert exact_match("the Exeter College.", "Exeter college") == 1.0
    assert exact_match("Exeter", "Exeter College") == 0.0


def test_f1_hand_computed():
    # pred tokens: [exeter, college, oxford]; gold: [exeter, college] -> P=2/3, R=1, F1=0.8
    assert f1_score("Exeter College, Oxford", "Exeter College") == pytest.approx(0.8)
    # [charles, county] vs [prince, georges, county]: P=1/2, R=1/3
    assert f1_score("Charles County", "Prince George's County") == pytest.approx(2 * (1 / 6) / (5 / 6))
    assert f1_score("Paris", "London") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("the", "London") == 0.0
    assert best_over(f1_score, "Charles County", ["Maryland", "Charles County"]) == 1.0


def test_rouge_l_hand_computed():
    # pred: [cat, sat, on, mat] ref: [cat, is, on, mat] -> LCS 3, P=3/4, R=3/4 -> 0.75
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.75)
    # LCS of [a1 b c d] / [b d e]: [b, d] = 2; P=2/4, R=2/3
    assert rouge_l("x b c d", "b d e") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert rouge_l("same words", "same words") == 1.0 and rouge_l("abc", "xyz") == 0.0


def test_kl_and_top1_hand_computed():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    kl = kl_divergence(p, q)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl[0].item() == pytest.approx(expected, rel=1e-5) and kl[1].item() == pytest.approx(0.0, abs=1e-6)
    assert top1_agreement(p, q) == 0.5  # row 0: argmax 0 (tie -> first) vs 1; row 1 agrees
    assert top1_agreement(q, q) == 1.0
