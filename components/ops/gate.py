"""The champion gate's rule: a candidate replaces the champion only when it is right significantly more
often on the same validation examples (one-sided exact McNemar test: scipy's binomial test on the
discordant pairs). components/ops/registry.py applies it under the alias lock.
"""
from __future__ import annotations

from typing import Sequence

from components.evaluate.stats import mcnemar_p  # noqa: F401 (the gate's test; registry and tests call it here)

DEFAULT_ALPHA = 0.05  # significance level of the gate (conf/params.yaml register.alpha)


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
