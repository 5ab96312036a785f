"""The champion gate's rule: a candidate replaces the champion only when it is right significantly more
often on the same validation examples (one-sided exact McNemar test: scipy's binomial test on the
discordant pairs). components/ops/registry.py applies it under the alias lock.
"""
from __future__ import annotations

from typing import Sequence

DEFAULT_ALPHA = 0.05  # significance level of the gate (conf/params.yaml register.alpha)


def mcnemar_p(candidate_correct: Sequence[bool], champion_correct: Sequence[bool]) -> tuple[float, int, int]:
    """One-sided exact McNemar test that the candidate is right more often than the champion.

    Returns (p, b, c): b = examples only the candidate gets right, c = only the champion;
    p = P(X >= b) for X ~ Binomial(b + c, 1/2) (1.0 when b <= c).

    Example:
        >>> mcnemar_p([True] * 10 + [False] * 2, [False] * 10 + [True] * 2)[0] < 0.05
        True
    """
    if len(candidate_correct) != len(champion_correct):
        raise ValueError("candidate and champion were scored on different numbers of examples")
    b = sum(1 for x, y in zip(candidate_correct, champion_correct) if x and not y)
    c = sum(1 for x, y in zip(candidate_correct, champion_correct) if y and not x)
    if b <= c:
        return 1.0, b, c
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative="greater").pvalue), b, c


def decide(candidate_correct: Sequence[bool], champion_correct: Sequence[bool] | None,
           alpha: float = DEFAULT_ALPHA) -> tuple[bool, str, dict]:
    """Gate rule on paired validation correctness: (promote?, reason, figures)."""
    n = len(candidate_correct)
    figures = {"gate_n": n, "candidate_val_accuracy": sum(candidate_correct) / n if n else None}
    if champion_correct is None:
        return True, "no champion yet", figures
    p, b, c = mcnemar_p(candidate_correct, champion_correct)
    figures.update({"champion_val_accuracy": sum(champion_correct) / n if n else None, "p_value": p,
                    "only_candidate_right": b, "only_champion_right": c, "alpha": alpha})
    gap = f"validation accuracy {figures['candidate_val_accuracy']:.4f} vs {figures['champion_val_accuracy']:.4f} " \
          f"(n={n}; only candidate right {b}, only champion right {c}; McNemar p={p:.3g})"
    if p < alpha:
        return True, f"significantly better: {gap} < {alpha}", figures
    return False, f"not significantly better: {gap} >= {alpha}; champion kept", figures
