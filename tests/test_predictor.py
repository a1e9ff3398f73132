"""APQ-style predictor search: it learns a miscalibrated proxy's group weights from measurements."""

from __future__ import annotations

import numpy as np
import pytest

from mpsearch.solvers import MILP, Problem
from mpsearch.solvers.predictor import PredictorConfig, QualityPredictor, decision_groups, predictor_search

pytest.importorskip("sklearn")
BITS = np.array([2.0, 3.0, 4.0, 8.0])


def setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{l}.{k}" for l in range(4) for k in ("self_attn.q_proj", "mlp.down_proj")]
    sizes = rng.integers(100, 1000, len(names))
    proxy = [rng.lognormal() * 2.0 ** (-2 * BITS) for _ in names]
    true_w = np.array([8.0 if "down" in n else 1.0 for n in names])  # the proxy underrates down_proj 8x
    problem = Problem.build(names, [["b2", "b3", "b4", "b8"]] * len(names), proxy, [BITS * s for s in sizes], 0.0)

    def measure(choice):
        return {"kl": float(sum(true_w[i] * proxy[i][j] for i, j in enumerate(choice)))}

    return problem, sizes, measure


def test_groups_are_kind_by_depth() -> None:
    names = [f"model.layers.{l}.mlp.down_proj" for l in range(4)] + ["lm_head"]
    assert decision_groups(names, 2) == ["down_proj@0", "down_proj@0", "down_proj@1", "down_proj@1", "lm_head"]


def test_predictor_search_beats_the_miscalibrated_proxy_at_equal_bits() -> None:
    """The truth weights down_proj 8x more than the proxy; measured plans reveal it."""
    problem, sizes, measure = setup()
    total = float(np.sum(sizes))
    budgets = [b * total for b in (3.0, 3.5, 4.0)]
    history = []
    for b in budgets + [2.5 * total, 5.0 * total]:
        s = MILP().solve(Problem.build(problem.decisions, problem.options, problem.loss, problem.cost, b))
        history.append((s.choice_, measure(s.choice_)))
    rng = np.random.default_rng(1)  # diverse measured plans, as an evolutionary search leaves behind
    history += [(c, measure(c)) for c in (tuple(rng.integers(0, 4, 8)) for _ in range(12))]
    df = predictor_search(problem, sizes, budgets, measure, history, PredictorConfig(rounds=2), progress=False)
    new = df[df["round"] >= 0]
    assert len(new) >= 1
    gains = []
    for (choice, q), b in zip(history, budgets):  # the first three seeds are the proxy's plans
        found = df[df.effective_bits <= b / total + 1e-12].kl.min()
        gains.append(q["kl"] - found)
    assert min(gains) >= -1e-12 and max(gains) > 0.01 * min(q["kl"] for _, q in history[:3])
    # After a round of feedback the predictor is close to the truth (which is additive here).
    last = new[new["round"] == new["round"].max()]
    assert np.allclose(last.kl, last.predicted, rtol=0.15)


def test_fit_rejects_nan_measurements() -> None:
    problem, sizes, _ = setup()
    pred = QualityPredictor(problem.loss, problem.cost, sizes, decision_groups(problem.decisions))
    with pytest.raises(ValueError, match="NaN"):
        pred.fit([(0,) * 8, (1,) * 8], [0.1, float("nan")])
