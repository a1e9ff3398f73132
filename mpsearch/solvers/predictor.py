"""Predictor-guided search (APQ-style): learn measured quality from measured plans, search on it.

The proxy says how much each (decision, format) costs in its own units; the
measurements say what whole plans really cost. A regressor maps plan features to
measured KL:

- proxy terms: the proxy's per-decision losses summed within each group of
  decisions (layer kind x depth), so the regressor can re-weight the proxy where
  it is miscalibrated (e.g. attention vs MLP, early vs late layers);
- bits: the quantization noise power ``4**-bits`` (the classic ``2**(-2b)`` error model),
  weight-averaged within the same groups, so the model stays convex in bits.

The proxy's own total is a further feature, so the ridge penalty spreads weight over
"the proxy, rescaled" and the group corrections instead of zeroing some groups (which
would send them to 2 bits): measured plans of one proxy are highly collinear. Fit on
diverse measured plans (an evolutionary search leaves them behind), not on the
proxy's own plans alone.
With non-negative coefficients (scikit-learn's positive ridge; the penalty chosen by
leave-one-out error), the prediction is
itself a sum over decisions, so "search on the predictor" is an exact MILP on the
re-weighted per-option losses: no sampling noise. Each round fits, solves at every
budget, measures the new plans and refits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from . import MILP, Problem, Status

Measure = Callable[[tuple[int, ...]], dict]


@dataclass(frozen=True)
class PredictorConfig:
    rounds: int = 3
    alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge penalties tried (leave-one-out)
    depth_groups: int = 2  # split layers into this many depth ranges
    objective: str = "kl"


def decision_groups(decisions: Sequence[str], depth_groups: int = 2) -> list[str]:
    """Group label per decision: the tensor kind (last name part) x a depth range (from ``layers.N``)."""
    depths = [int(m[1]) if (m := re.search(r"layers\.(\d+)\.", d)) else -1 for d in decisions]
    n_layers = max(depths) + 1 if max(depths, default=-1) >= 0 else 1
    out = []
    for name, depth in zip(decisions, depths):
        kind = re.sub(r"[^A-Za-z_]", "", name.rsplit(".", 1)[-1]) or "other"
        out.append(f"{kind}@{depth * depth_groups // n_layers}" if depth >= 0 else kind)
    return out


class QualityPredictor:
    """Additive, non-negative linear model of measured quality (scikit-learn style)."""

    def __init__(
        self,
        proxy_loss: Sequence[np.ndarray],
        bits: Sequence[np.ndarray],
        sizes: Sequence[int],
        groups: Sequence[str],
        alphas: Sequence[float] = PredictorConfig.alphas,
    ) -> None:
        self.proxy_loss = [np.asarray(v, float) for v in proxy_loss]
        self.sizes = np.asarray(sizes, float)
        # per option: weight share x noise power 4**-bits, from the total effective bits per option
        self.noise = [n / self.sizes.sum() * 4.0 ** (-np.asarray(b, float) / n) for b, n in zip(bits, self.sizes)]
        self.groups = list(groups)
        self.labels = sorted(set(self.groups))
        self.alphas = tuple(alphas)

    def features(self, choices: Sequence[Sequence[int]]) -> np.ndarray:
        """Columns: the proxy total, then the proxy per group, then the noise power per group."""
        g = {lab: k for k, lab in enumerate(self.labels)}
        n = len(self.labels)
        x = np.zeros((len(choices), 1 + 2 * n))
        for r, choice in enumerate(choices):
            for i, j in enumerate(choice):
                k = g[self.groups[i]]
                x[r, 0] += self.proxy_loss[i][j]
                x[r, 1 + k] += self.proxy_loss[i][j]
                x[r, 1 + n + k] += self.noise[i][j]
        return x

    def fit(self, choices: Sequence[Sequence[int]], quality: Sequence[float]) -> "QualityPredictor":
        from sklearn.linear_model import Ridge

        x, y = self.features(choices), np.asarray(quality, float)
        if not np.all(np.isfinite(y)):
            raise ValueError("measured quality contains NaN or inf; cannot fit the predictor")
        self.scale_ = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        xs = x / self.scale_

        def loo_error(alpha: float) -> float:
            errs = []
            for i in range(len(y)):
                keep = np.arange(len(y)) != i
                errs.append(
                    float(Ridge(alpha=alpha, positive=True).fit(xs[keep], y[keep]).predict(xs[i : i + 1])[0] - y[i])
                    ** 2
                )
            return float(np.mean(errs))

        self.alpha_ = min(self.alphas, key=loo_error) if len(y) >= 3 and len(self.alphas) > 1 else self.alphas[0]
        model = Ridge(alpha=self.alpha_, positive=True).fit(xs, y)
        self.coef_ = model.coef_ / self.scale_
        self.intercept_ = float(model.intercept_)
        self.n_plans_ = len(y)
        return self

    def predict(self, choices: Sequence[Sequence[int]]) -> np.ndarray:
        return self.features(choices) @ self.coef_ + self.intercept_

    def option_losses(self) -> list[np.ndarray]:
        """Per-decision, per-option share of the prediction: the MILP's objective."""
        g = {lab: k for k, lab in enumerate(self.labels)}
        n = len(self.labels)
        out = []
        for i, (pl, noise) in enumerate(zip(self.proxy_loss, self.noise)):
            k = g[self.groups[i]]
            out.append((self.coef_[0] + self.coef_[1 + k]) * pl + self.coef_[1 + n + k] * noise)
        return out


def predictor_search(
    problem: Problem,
    sizes: Sequence[int],
    budgets: Sequence[float],
    measure: Measure,
    history: Sequence[tuple[Sequence[int], dict]],
    config: PredictorConfig = PredictorConfig(),
    progress: bool = True,
) -> pd.DataFrame:
    """Rounds of fit -> MILP at each budget (total bits) -> measure the new plans.

    ``problem`` carries the proxy losses and bit costs; ``history`` holds plans already
    measured (choice, quality dict), e.g. the proxy's MILP plans. Returns one row per
    measured plan with the round it came from (-1: history) and its prediction.
    """
    from tqdm.auto import tqdm

    if len(history) < 2:
        raise ValueError("predictor search needs at least 2 measured plans to start from")
    choices = [tuple(int(j) for j in c) for c, _ in history]
    quality = [float(q[config.objective]) for _, q in history]
    rows = [
        {"round": -1, "choice": c, "effective_bits": None, config.objective: q, "predicted": None}
        for c, q in zip(choices, quality)
    ]
    pred = QualityPredictor(
        problem.loss, problem.cost, sizes, decision_groups(problem.decisions, config.depth_groups), config.alphas
    )
    for rnd in tqdm(range(config.rounds), desc="predictor rounds", disable=not progress):
        pred.fit(choices, quality)
        losses = pred.option_losses()
        for budget in budgets:
            s = MILP().solve(Problem.build(problem.decisions, problem.options, losses, problem.cost, budget))
            if s.status_ not in Status.SOLUTION_PRESENT:
                raise ValueError(f"predictor MILP returned {s.status_} at budget {budget}")
            if s.choice_ in choices:
                continue
            q = measure(s.choice_)
            choices.append(s.choice_)
            quality.append(float(q[config.objective]))
            rows.append(
                {
                    "round": rnd,
                    "choice": s.choice_,
                    "budget": budget,
                    config.objective: quality[-1],
                    "predicted": float(pred.predict([s.choice_])[0]),
                    **{k: v for k, v in q.items() if k != config.objective},
                }
            )
    total = float(np.sum(sizes))
    df = pd.DataFrame(rows)
    df["effective_bits"] = [float(sum(problem.cost[i][j] for i, j in enumerate(c))) / total for c in df["choice"]]
    return df
