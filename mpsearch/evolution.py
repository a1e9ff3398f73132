"""Evolutionary search on measured quality: Optuna's NSGA-II over per-decision formats.

Proxies are additive guesses; the true loss of a plan is not a sum. This search
measures plans (KL or perplexity on held-out text) and evolves them on two
objectives, measured quality and effective bits. It starts from the solver's
Pareto plans (``enqueue_trial``), so it can only add to the proxy's front.

- A study lives in an Optuna storage: a journal file by default, so an interrupted
  run resumes where it stopped (a trial cut off mid-evaluation is marked failed and
  the study continues to the requested number of trials).
- Plans are deduplicated by content: a plan already measured in the study is
  answered from the study, never evaluated twice; the caller's ``measure`` may add
  its own disk cache on top.
- Plans outside the effective-bits window are never measured: they complete with a
  window violation (Optuna constraint), so NSGA-II ranks them below every plan inside.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: measure(choice) -> {"kl": ..., "ppl": ...}: the measured quality of a plan.
Measure = Callable[[tuple[int, ...]], dict]


@dataclass(frozen=True)
class EvolutionConfig:
    """``trials`` counts every trial of the study, earlier runs included (resume = same number)."""

    trials: int = 48
    population: int = 16
    objective: str = "kl"
    min_bits: float | None = None
    max_bits: float | None = None
    seed: int = 0
    study_name: str = "mpsearch"

    def __post_init__(self) -> None:
        if self.trials < 1 or self.population < 2:
            raise ValueError(f"need trials >= 1 and population >= 2, got {self.trials}, {self.population}")
        if self.objective not in ("kl", "ppl", "nll"):
            raise ValueError(f"objective must be kl, ppl or nll, got {self.objective!r}")
        if self.min_bits is not None and self.max_bits is not None and self.min_bits > self.max_bits:
            raise ValueError(f"empty bits window [{self.min_bits}, {self.max_bits}]")


@dataclass(frozen=True)
class Space:
    """What the search chooses among: options per decision and their total bits.

    Options must run from cheapest to most expensive: each decision is an integer
    parameter (an index into its options), so NSGA-II's polynomial mutation moves a
    tensor to a neighbouring format instead of any format at random.
    """

    decisions: tuple[str, ...]
    options: tuple[tuple[str, ...], ...]
    bits: tuple[np.ndarray, ...]  # total effective bits of each option
    numel: int  # weights over all decisions

    def effective_bits(self, choice: Sequence[int]) -> float:
        return float(sum(float(b[j]) for b, j in zip(self.bits, choice))) / self.numel

    def plan_hash(self, choice: Sequence[int]) -> str:
        body = "|".join(f"{d}={o[j]}" for d, o, j in zip(self.decisions, self.options, choice))
        return hashlib.sha256(body.encode()).hexdigest()[:20]

    def params(self, choice: Sequence[int]) -> dict[str, int]:
        """The trial parameters of a plan: one option index per decision."""
        return {d: int(j) for d, j in zip(self.decisions, choice)}

    def check(self) -> None:
        for d, b in zip(self.decisions, self.bits):
            if np.any(np.diff(b) < 0):
                raise ValueError(f"decision {d!r}: options must be ordered from cheapest to most expensive")


def journal_storage(path: str | Path):
    """The default storage: a journal file next to the run's outputs (no server, resumable).

    A torn last line (a write cut short by a full disk or a power loss) is cut off first,
    with a warning, so the study stays readable (:func:`repair_journal`).
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    repair_journal(path)
    return JournalStorage(JournalFileBackend(str(path)))


def repair_journal(path: str | Path) -> int:
    """Cut unreadable lines off the end of an Optuna journal file; return how many bytes were cut.

    Optuna appends one JSON object per line. An append cut short leaves a last line
    without its newline; Optuna skips it on read, but its next append continues that
    line and the study becomes unreadable for good. The cut bytes are kept beside the
    journal (``<name>.torn``). A bad line *before* a good one is not a torn write: that
    is an error naming the line.
    """
    import json

    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")  # the part after the last newline is lines[-1] (b"" when none is torn)
    good = len(lines) - 1
    while good > 0:
        try:
            json.loads(lines[good - 1])
            break
        except (UnicodeDecodeError, json.JSONDecodeError):
            good -= 1
    for i, line in enumerate(lines[:good]):
        try:
            json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: line {i + 1} of the study journal is corrupt and later lines are not; "
                             "it cannot be repaired automatically") from None
    tail_start = sum(len(x) + 1 for x in lines[:good])
    if tail_start == len(data):
        return 0
    torn = path.with_name(path.name + ".torn")
    with open(torn, "ab") as f:
        f.write(data[tail_start:] + b"\n")
    with open(path, "r+b") as f:
        f.truncate(tail_start)
    log.warning("%s: cut %d bytes of a torn write off the end of the study journal (kept in %s)",
                path, len(data) - tail_start, torn)
    return len(data) - tail_start


def evolve(space: Space, measure: Measure, storage, config: EvolutionConfig = EvolutionConfig(),
           seeds: Sequence[Sequence[int]] = (), progress: bool = True) -> pd.DataFrame:
    """Run (or resume) the NSGA-II study in ``storage``; return every trial as a table.

    ``storage`` is an Optuna storage, a database URL (``sqlite:///study.db``) or a
    journal file path. ``seeds`` are plans (option index per decision), e.g. the
    proxy's Pareto plans: each is measured and added to the study as a member of
    NSGA-II's first generation. (``enqueue_trial`` would not do: in Optuna 5 enqueued
    trials never join the sampler's generation 0, so the random first generation,
    mostly outside any useful bits window, would be the only parents.)
    """
    import optuna
    from optuna.distributions import IntDistribution
    from optuna.samplers.nsgaii import PolynomialMutation
    from optuna.trial import TrialState, create_trial

    if isinstance(storage, (str, Path)):
        url = str(storage)
        storage = optuna.storages.get_storage(url) if "://" in url else journal_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space.check()
    with warnings.catch_warnings():  # PolynomialMutation is marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.NSGAIISampler(population_size=config.population, seed=config.seed, mutation=PolynomialMutation())
    study = optuna.create_study(study_name=config.study_name, storage=storage, sampler=sampler,
                                directions=["minimize", "minimize"], load_if_exists=True)
    signature = [f"{d}:{','.join(o)}" for d, o in zip(space.decisions, space.options)]
    if study.user_attrs.get("space") not in (None, signature):
        raise ValueError(f"study {config.study_name!r} in this storage searches other decisions or formats; "
                         "use a new storage file or another study_name")
    study.set_user_attr("space", signature)
    study_id = storage.get_study_id_from_name(config.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Left running by an interrupted run: its evaluation never finished.
        storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number), TrialState.FAIL)
        log.info("trial %d was interrupted; marked failed and not counted", t.number)

    seen = {t.user_attrs["plan_hash"]: t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("measured")}
    distributions = {d: IntDistribution(0, len(o) - 1) for d, o in zip(space.decisions, space.options)}

    def violation(bits: float) -> float:
        """<= 0 inside the window; how far outside it otherwise (Optuna's constraint convention)."""
        lo = config.min_bits if config.min_bits is not None else -np.inf
        hi = config.max_bits if config.max_bits is not None else np.inf
        return float(max(lo - bits, bits - hi, -1.0))

    def quality_of(choice: tuple[int, ...], key: str) -> tuple[dict, bool]:
        if key in seen:
            return {k: v for k, v in seen[key].items() if k in ("kl", "ppl", "nll")}, True
        return measure(choice), False

    def attrs(key: str, bits: float, quality: dict | None, dup: bool, source: str) -> dict:
        out = {"plan_hash": key, "effective_bits": bits, "source": source, "measured": quality is not None, "duplicate": dup}
        out.update({k: float(quality[k]) for k in ("kl", "ppl", "nll") if quality and k in quality})
        return out

    for choice in _unique(space, seeds):  # measured first; a resumed run skips the ones done
        key, bits = space.plan_hash(choice), space.effective_bits(choice)
        if key in seen or violation(bits) > 0:
            continue
        quality, dup = quality_of(choice, key)
        user = attrs(key, bits, quality, dup, "seed")
        study.add_trial(create_trial(
            values=[float(quality[config.objective]), bits], params=space.params(choice), distributions=distributions,
            # The sampler's own generation tag (a private name, pinned by test_offspring_descend_from_the_seeds).
            user_attrs=user, system_attrs={optuna.samplers.NSGAIISampler._GENERATION_KEY: 0}, constraints={"window": violation(bits)},
        ))
        seen[key] = user

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        choice = tuple(trial.suggest_int(d, 0, len(space.options[i]) - 1) for i, d in enumerate(space.decisions))
        key, bits = space.plan_hash(choice), space.effective_bits(choice)
        trial.set_constraint("window", violation(bits))
        if violation(bits) > 0:  # not measured: NSGA-II ranks it below every plan inside the window
            for k, v in attrs(key, bits, None, False, "nsga2").items():
                trial.set_user_attr(k, v)
            return _OUTSIDE, bits
        quality, dup = quality_of(choice, key)
        user = attrs(key, bits, quality, dup, "nsga2")
        for k, v in user.items():
            trial.set_user_attr(k, v)
        seen[key] = user
        return float(quality[config.objective]), bits

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    remaining = config.trials - len(done)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, show_progress_bar=progress, catch=())
    return trials_table(study)


#: The quality value recorded for unmeasured plans outside the bits window.
_OUTSIDE = 1e12


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, state, source, bits, measured quality, plan hash, params.

    ``measured`` is False for plans outside the bits window (their objective value is a
    placeholder); ``duplicate`` is True when the study already held the plan's measurement.
    """
    rows = []
    for t in study.trials:
        u = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name, "source": u.get("source"),
                     "effective_bits": u.get("effective_bits"), "kl": u.get("kl"), "ppl": u.get("ppl"),
                     "measured": u.get("measured", False), "duplicate": u.get("duplicate"),
                     "plan_hash": u.get("plan_hash"), "params": t.params})
    return pd.DataFrame(rows)


def pareto_mask(bits: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """True for points no other point beats on both (fewer-or-equal bits and lower-or-equal quality)."""
    bits, quality = np.asarray(bits, float), np.asarray(quality, float)
    keep = np.ones(bits.size, dtype=bool)
    for i in range(bits.size):
        dominated = (bits <= bits[i]) & (quality <= quality[i]) & ((bits < bits[i]) | (quality < quality[i]))
        keep[i] = not dominated.any()
    return keep


def _unique(space: Space, seeds: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    out, keys = [], set()
    for s in seeds:
        s = tuple(int(j) for j in s)
        if len(s) != len(space.decisions):
            raise ValueError(f"seed plan has {len(s)} choices for {len(space.decisions)} decisions")
        if space.plan_hash(s) not in keys:
            keys.add(space.plan_hash(s))
            out.append(s)
    return out


def front_seeds(problem, bits_per_choice: Callable[[Sequence[int]], float], lo: float, hi: float, k: int) -> list[tuple[int, ...]]:
    """Up to ``k`` points of the proxy's Pareto front inside [lo, hi] bits, evenly spread by bits."""
    from .solvers import pareto_front

    front = pareto_front(problem)
    points = [(bits_per_choice(front.choice(i)), i) for i in range(len(front))]
    inside = [(b, i) for b, i in points if lo <= b <= hi]
    if not inside:
        return []
    targets = np.linspace(inside[0][0], inside[-1][0], k)
    picked = sorted({min(inside, key=lambda p: abs(p[0] - t))[1] for t in targets})
    return [front.choice(i) for i in picked]


def hull_space(problem, numel: int, seeds: Sequence[Sequence[int]]) -> tuple[Space, list[list[int]]]:
    """The evolution's space: per decision, the options on the proxy's lower convex hull
    (the only ones any budget's proxy optimum uses) plus any option a seed uses, ordered
    by cost. Returns the space and, per decision, the original option index of each option.
    """
    from .solvers.lagrangian import decision_hull

    kept = []
    for i, (loss, cost) in enumerate(zip(problem.loss, problem.cost)):
        keep = set(decision_hull(loss, cost)) | {int(seed[i]) for seed in seeds}
        kept.append(sorted(keep, key=lambda j: (cost[j], loss[j], j)))
    space = Space(problem.decisions, tuple(tuple(problem.options[i][j] for j in k) for i, k in enumerate(kept)),
                  tuple(problem.cost[i][k] for i, k in enumerate(kept)), numel)
    return space, kept


def run_evolution(session, proxy: str, config: EvolutionConfig, out_dir: str | Path,
                  extra_seeds: Sequence[Sequence[int]] = (), storage=None) -> pd.DataFrame:
    """NSGA-II on a prepared :class:`~mpsearch.session.Session`, seeded from ``proxy``'s front.

    Searches each decision's proxy-hull formats (:func:`hull_space`). Writes
    ``trials.csv``, ``front.csv`` (the measured Pareto front), the front's plans and
    ``pareto.png`` under ``out_dir``; the study journal is ``out_dir/study.log`` unless
    ``storage`` is given, so running the same call again resumes.
    """
    from .report import pareto_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problem = session.problem(proxy)
    budget_bits = [b.total_bits(session.numel) / session.numel for b in session.budgets]
    lo = config.min_bits if config.min_bits is not None else min(budget_bits) - 0.25
    hi = config.max_bits if config.max_bits is not None else max(budget_bits) + 0.25
    config = replace(config, min_bits=lo, max_bits=hi)
    full = Space(problem.decisions, problem.options, problem.cost, session.numel)
    seeds = [tuple(int(j) for j in c) for c in extra_seeds] + front_seeds(problem, full.effective_bits, lo, hi, config.population)
    space, kept = hull_space(problem, session.numel, seeds)
    position = [{j: k for k, j in enumerate(row)} for row in kept]

    def original(choice: Sequence[int]) -> tuple[int, ...]:
        return tuple(kept[i][j] for i, j in enumerate(choice))

    local_seeds = [tuple(position[i][j] for i, j in enumerate(c)) for c in seeds]
    df = evolve(space, lambda c: session.measure_choice(original(c)), storage or out / "study.log", config,
                local_seeds, session.config.progress)
    df.drop(columns=["params"]).to_csv(out / "trials.csv", index=False)
    done = df[df.measured.astype(bool)].drop_duplicates("plan_hash")
    front = done[pareto_mask(done.effective_bits.to_numpy(), done[config.objective].to_numpy())].sort_values("effective_bits")
    front.drop(columns=["params"]).to_csv(out / "front.csv", index=False)
    (out / "plans").mkdir(exist_ok=True)
    for _, row in front.iterrows():
        choice = original([row.params[d] for d in space.decisions])
        plan = session.make_plan(session.formats(choice), proxy=proxy, search="nsga2", trial=int(row.trial))
        plan.metrics.update({k: row[k] for k in ("kl", "ppl") if pd.notna(row[k])})
        plan.save(out / "plans" / f"nsga2-{row.effective_bits:.3f}bits-trial{int(row.trial)}.json")
    pareto_plot(done.assign(method=done.source), out / "pareto.png", y=config.objective,
                title=f"NSGA-II on measured {config.objective} ({len(done)} plans measured)")
    complete = [isinstance(p, dict) and len(p) == len(space.decisions) for p in df.params]  # failed trials may be partial
    return df.assign(choice=[original([p[d] for d in space.decisions]) if ok else None for p, ok in zip(df.params, complete)])
