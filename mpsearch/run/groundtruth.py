"""Ground truth for ranking proxies: sampled plans with their measured quality.

:func:`make_ground_truth` samples plans from an open :class:`~mpsearch.run.session.Session`,
stratified over effective bits (equal counts per bits bin) and over how far each sits
from a proxy optimum (a share of its decisions redrawn away from one proxy's MILP plan
at the same budget, from 0 to all of them), measures each, and writes one CSV row per
plan as soon as it is measured; a rerun skips the rows already there. Plan ``i`` depends
only on ``(seed, i)`` and the session, so a resumed or extended run draws the same plans.

The CSV holds each plan's format per decision (``formats``, JSON) so anyone can score
their own proxy on it; ``<name>.json`` beside it holds the settings it was made with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..core.files import write_json_atomic
from ..solvers import Status, get_solver

log = logging.getLogger(__name__)

SCHEMA = "ground-truth/v1"


@dataclass(frozen=True)
class SamplerConfig:
    """How plans are drawn: ``bins`` effective-bits bins over ``[lo, hi]``, and the shares of
    decisions redrawn away from the anchor proxy's optimum (0: the optimum itself, 1: a random plan)."""

    plans: int = 300
    lo: float = 2.5
    hi: float = 6.5
    bins: int = 6
    redraw: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)
    #: proxies whose MILP plans anchor the samples (rotated); empty = every proxy of the session
    anchors: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.plans < 1 or self.bins < 1 or not self.lo < self.hi:
            raise ValueError(
                f"need plans >= 1, bins >= 1 and lo < hi, got {self.plans}, {self.bins}, {self.lo}, {self.hi}"
            )
        if not self.redraw or any(not 0 <= r <= 1 for r in self.redraw):
            raise ValueError(f"redraw shares must be in [0, 1], got {self.redraw}")


@dataclass
class Sample:
    """One drawn plan: its option per decision and how it was drawn."""

    index: int
    choice: tuple[int, ...]
    bin: int
    redraw: float
    anchor: str
    target_bits: float
    distance: float  # share of decisions whose format differs from the anchor's optimum
    extra: dict = field(default_factory=dict)


def draw(session, cfg: SamplerConfig, i: int) -> Sample:
    """Plan ``i``: bin ``i % bins``, redraw share by ``i // bins``, anchor proxy rotated; a
    budget drawn in the bin, the anchor's MILP plan there, a share of decisions moved to
    random options, then random one-step moves until the effective bits are back in the bin."""
    anchors = list(cfg.anchors or session.tables)
    rng = np.random.default_rng([cfg.seed, i])
    b = i % cfg.bins
    share = cfg.redraw[(i // cfg.bins) % len(cfg.redraw)]
    anchor = anchors[(i // (cfg.bins * len(cfg.redraw))) % len(anchors)]
    width = (cfg.hi - cfg.lo) / cfg.bins
    lo, hi = cfg.lo + b * width, cfg.lo + (b + 1) * width
    target = float(rng.uniform(lo, hi))
    numel = session.numel
    solver = get_solver("milp").solve(session.problem(anchor, target * numel))
    if solver.status_ not in Status.SOLUTION_PRESENT:
        raise RuntimeError(f"the MILP for anchor {anchor} at {target:.3f} bits returned {solver.status_}")
    optimum = list(int(j) for j in solver.choice_)
    choice = list(optimum)
    k = int(round(share * len(choice)))
    for d in rng.choice(len(choice), size=k, replace=False):
        choice[d] = int(rng.integers(len(session.decisions[d].formats)))
    _repair(session, choice, lo * numel, hi * numel, rng)
    distance = float(np.mean([a != o for a, o in zip(choice, optimum)]))
    return Sample(i, tuple(choice), b, share, anchor, target, distance)


def _repair(session, choice: list[int], lo: float, hi: float, rng: np.random.Generator, steps: int = 100_000) -> None:
    """Random one-step moves (next cheaper / dearer option of a random decision) until the cost is in [lo, hi]."""
    order = session.options_by_cost
    cost = session.choice_cost(choice)
    for _ in range(steps):
        if lo <= cost <= hi:
            return
        d = int(rng.integers(len(choice)))
        pos = order[d].index(choice[d])
        nxt = pos - 1 if cost > hi else pos + 1
        if not 0 <= nxt < len(order[d]):
            continue
        before = float(session.costs[d][choice[d]])
        choice[d] = order[d][nxt]
        cost += float(session.costs[d][choice[d]]) - before
    raise RuntimeError(f"could not bring a sampled plan into [{lo / session.numel:.3f}, {hi / session.numel:.3f}] bits")


def make_ground_truth(
    session, out: str | Path, cfg: SamplerConfig, settings: dict | None = None, progress: bool = True
) -> pd.DataFrame:
    """Draw and measure ``cfg.plans`` plans; CSV rows written as they are measured (resumable)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "schema": SCHEMA,
        "sampler": asdict(cfg),
        "model": session.lm.model_id,
        "weights": session.prims.weights,
        "space": session.space.name,
        "decisions": [d.name for d in session.decisions],
        "reference": {k: v for k, v in session.evaluator.reference_.to_dict().items() if not k.endswith("_windows")},
        **(settings or {}),
    }
    meta_path = out.with_suffix(".json")
    done = pd.DataFrame()
    if out.exists() and meta_path.exists():
        old = json.loads(meta_path.read_text())
        new = json.loads(json.dumps(meta))  # tuples as lists, as the file has them
        skip = {"sampler", "machine", "reference"}  # a resumed run may draw more plans, on another machine
        same = {k: v for k, v in old.items() if k not in skip} == {k: v for k, v in new.items() if k not in skip}
        same = same and {k: v for k, v in old["sampler"].items() if k != "plans"} == {
            k: v for k, v in new["sampler"].items() if k != "plans"
        }
        if not same:
            raise ValueError(f"{out} was made with other settings ({meta_path}); remove it or write elsewhere")
        done = pd.read_csv(out)
    write_json_atomic(meta_path, meta)
    rows = done.to_dict("records")
    have = {int(r["plan"]) for r in rows}
    bar = tqdm(
        total=cfg.plans,
        initial=len(have & set(range(cfg.plans))),
        desc="ground truth",
        disable=not progress,
        unit="plan",
    )
    for i in range(cfg.plans):
        if i in have:
            continue
        s = draw(session, cfg, i)
        formats = session.formats(s.choice)
        q = session.measure(session.make_plan(formats), desc=f"plan {i}")
        rows.append(
            {
                "plan": i,
                "bin": s.bin,
                "redraw": s.redraw,
                "anchor": s.anchor,
                "target_bits": s.target_bits,
                "distance": s.distance,
                "effective_bits": session.choice_cost(s.choice) / session.numel,
                **{k: v for k, v in q.items() if not k.endswith("_windows")},
                "kl_windows": json.dumps(q.get("kl_windows", [])),
                "nll_windows": json.dumps(q.get("nll_windows", [])),
                "formats": json.dumps({d.name: d.formats[j].key for d, j in zip(session.decisions, s.choice)}),
            }
        )
        _write(out, rows)
        bar.update()
    bar.close()
    return pd.read_csv(out)


def _write(path: Path, rows: list[dict]) -> None:
    from ..core.files import write_csv_atomic

    write_csv_atomic(path, pd.DataFrame(rows).sort_values("plan"))


def load_ground_truth(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """A ground-truth table and its settings, checked: the columns a leaderboard reads are there."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ground-truth file {path}")
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise ValueError(f"{path} has no settings file {meta_path}: it was not made by make_ground_truth")
    df = pd.read_csv(path)
    missing = {"plan", "effective_bits", "kl", "formats"} - set(df)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    return df, json.loads(meta_path.read_text())
