"""Verification arithmetic, without models."""

from __future__ import annotations

import numpy as np

from export.verify import fit_context, greedy_agreement, kl_divergence


def test_kl_divergence():
    a = np.array([2.0, 1.0, 0.0])
    assert kl_divergence(a, a) == 0.0
    assert kl_divergence(a, a + 5.0) < 1e-12  # a shift changes no probability
    assert kl_divergence(a, a[::-1].copy()) > 1.0


def test_greedy_agreement_counts_leading_tokens():
    steps = [np.array([0.0, 5.0, 1.0])] * 4
    assert greedy_agreement(steps, [1, 1, 1, 1], [1, 1, 1, 1], tie=0.01) == (4, False)
    assert greedy_agreement(steps, [1, 1, 1, 1], [1, 1, 2, 1], tie=0.01) == (2, False)


def test_greedy_divergence_at_a_near_tie_is_flagged():
    steps = [np.array([0.0, 5.0, 1.0]), np.array([3.0, 3.0005, 0.0])]
    assert greedy_agreement(steps, [1, 1], [1, 0], tie=0.01) == (1, True)
    assert greedy_agreement(steps, [1, 1], [1, 2], tie=0.01) == (1, False)


def test_fit_context_keeps_prompt_tails():
    prompts, n = fit_context([list(range(100)), [1, 2]], 32, 48)
    assert n == 24 and prompts == [list(range(76, 100)), [1, 2]]
    assert fit_context([[1]], 32, 0) == ([[1]], 32)
