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
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..core.stats import pareto_mask
from .outputs import write_plans, write_tables

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


def evolve(
    space: Space,
    measure: Measure,
    storage,
    config: EvolutionConfig = EvolutionConfig(),
    seeds: Sequence[Sequence[int]] = (),
    progress: bool = True,
    work: bool = True,
    sampler_seed: int | None = None,
) -> pd.DataFrame:
    """Create (or resume) the NSGA-II study in ``storage``, enqueue ``seeds`` once, and
    measure trials until the study holds ``config.trials`` complete ones; return every trial.

    ``storage`` is an Optuna storage, a database URL or a journal file path
    (:func:`mpsearch.store.storage.open_storage`). ``seeds`` are plans (option index per
    decision), e.g. the proxy's Pareto plans: they are the first trials any worker runs and
    join NSGA-II's first generation. Other processes may work on the same study at the
    same time (:func:`work`); ``work=False`` only creates and seeds it.
    """
    study = open_study(space, storage, config, sampler_seed)
    enqueue_seeds(study, space, config, seeds)
    if work:
        run_trials(study, space, measure, config, progress)
    return trials_table(study)


def open_study(space: Space, storage, config: EvolutionConfig, sampler_seed: int | None = None, owner: bool = True):
    """The study named ``config.study_name`` in ``storage``, created if new; refused if it searches another space.

    The evolution's settings are stored in the study, so a worker that joins it reads them
    (:func:`study_config`): the ``owner`` (``mpsearch evolve``) writes them, so a rerun with more
    trials extends the study for every worker. ``sampler_seed`` (default ``config.seed``) should differ per worker.
    """
    import optuna
    from optuna.samplers.nsgaii import PolynomialMutation

    from ..store.storage import open_storage

    if isinstance(storage, (str, Path)):
        storage = open_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space.check()
    with warnings.catch_warnings():  # PolynomialMutation is marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.NSGAIISampler(
            population_size=config.population,
            mutation=PolynomialMutation(),
            seed=config.seed if sampler_seed is None else sampler_seed,
        )
    study = optuna.create_study(
        study_name=config.study_name,
        storage=storage,
        sampler=sampler,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )
    signature = [f"{d}:{','.join(o)}" for d, o in zip(space.decisions, space.options)]
    if study.user_attrs.get("space") not in (None, signature):
        raise ValueError(
            f"study {config.study_name!r} in this storage searches other decisions or formats; "
            "use a new storage file or another study_name"
        )
    if "space" not in study.user_attrs:
        study.set_user_attr("space", signature)
    if owner:
        study.set_user_attr("evolution", {k: v for k, v in asdict(config).items() if k != "study_name"})
    return study


def study_config(study) -> EvolutionConfig:
    """The settings the study was created with (what a joining worker runs)."""
    if "evolution" not in study.user_attrs:
        raise ValueError(
            f"study {study.study_name!r} was not created by mpsearch evolve (it has no evolution settings)"
        )
    return EvolutionConfig(**study.user_attrs["evolution"], study_name=study.study_name)


def enqueue_seeds(study, space: Space, config: EvolutionConfig, seeds: Sequence[Sequence[int]]) -> int:
    """Enqueue the seed plans inside the bits window, once per study; return how many."""
    seeds = _unique(space, seeds)
    if study.user_attrs.get("seeded"):
        return 0
    inside = [s for s in seeds if _violation(config, space.effective_bits(s)) <= 0]
    for choice in inside:
        study.enqueue_trial(space.params(choice), user_attrs={"source": "seed"}, skip_if_exists=True)
    study.set_user_attr("seeded", True)
    return len(inside)


def _violation(config: EvolutionConfig, bits: float) -> float:
    """<= 0 inside the window; how far outside it otherwise (Optuna's constraint convention)."""
    lo = config.min_bits if config.min_bits is not None else -np.inf
    hi = config.max_bits if config.max_bits is not None else np.inf
    return float(max(lo - bits, bits - hi, -1.0))


def run_trials(
    study, space: Space, measure: Measure, config: EvolutionConfig, progress: bool = True, poll: float = 0.5
) -> None:
    """Measure trials of ``study`` until it holds ``config.trials`` complete ones (other workers' count too).

    A plan is measured once per study: the first trial to claim its hash measures it, any
    other trial drawing it waits for that result and records it as a duplicate. If the
    owner's worker dies, its heartbeat runs out, its trial is failed and retried, and a
    waiting trial takes the plan over. Workers running at once may finish a trial or two
    beyond ``config.trials`` (each completes the trial it is in).
    """
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from ..store.storage import claims_for

    storage = study._storage
    claims = claims_for(storage, study.study_name)
    generation_key = optuna.samplers.NSGAIISampler._GENERATION_KEY  # pinned by test_offspring_descend_from_the_seeds
    results: dict[str, dict] = {}  # this worker's view of measured plans by hash

    def owner_result(owner: int) -> tuple[dict | None, bool]:
        """(quality, finished) of the owner trial: quality when it measured, finished when it stopped without."""
        t = storage.get_trial(owner)
        if t.state == TrialState.COMPLETE and t.user_attrs.get("measured"):
            return {k: t.user_attrs[k] for k in ("kl", "ppl", "nll") if k in t.user_attrs}, True
        return None, t.state.is_finished()

    def quality_of(trial, choice: tuple[int, ...], key: str) -> tuple[dict, bool]:
        if key in results:
            return results[key], True
        me, last_sweep = trial._trial_id, time.monotonic()
        owner = claims.claim(key, me)
        while owner != me:
            quality, finished = owner_result(owner)
            if quality is not None:
                return quality, True
            if finished:  # the owner failed: take the plan over (unless another waiter already has)
                owner = claims.replace(key, owner, me)
                continue
            if time.monotonic() - last_sweep > 4 * poll:  # a dead owner is noticed by its heartbeat
                _fail_stale(study)
                last_sweep = time.monotonic()
            time.sleep(poll)
        return measure(choice), False

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        choice = tuple(trial.suggest_int(d, 0, len(space.options[i]) - 1) for i, d in enumerate(space.decisions))
        source = trial.user_attrs.get("source", "nsga2")
        if source == "seed":  # the seeds are NSGA-II's first generation, whenever they run
            storage.set_trial_system_attr(trial._trial_id, generation_key, 0)
        key, bits = space.plan_hash(choice), space.effective_bits(choice)
        for k, v in (("plan_hash", key), ("effective_bits", bits), ("source", source), ("measured", False)):
            trial.set_user_attr(k, v)  # a trial cut off mid-measurement still says what it measured
        trial.set_constraint("window", _violation(config, bits))
        if _violation(config, bits) > 0:  # not measured: NSGA-II ranks it below every plan inside the window
            trial.set_user_attr("duplicate", False)
            return _OUTSIDE, bits
        quality, dup = quality_of(trial, choice, key)
        results[key] = quality
        trial.set_user_attr("duplicate", dup)
        for k in ("kl", "ppl", "nll"):
            if k in quality:
                trial.set_user_attr(k, float(quality[k]))
        trial.set_user_attr("measured", True)
        return float(quality[config.objective]), bits

    def report(study, t) -> None:
        if progress:
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            what = (
                "outside the window"
                if not t.user_attrs.get("measured")
                else f"{config.objective} {t.user_attrs.get(config.objective, float('nan')):.4g}"
                + (" (measured by another trial)" if t.user_attrs.get("duplicate") else "")
            )
            log.info(
                "trial %d %s: %s at %.3f bits | %d of %d complete",
                t.number,
                t.state.name.lower(),
                what,
                t.user_attrs.get("effective_bits", float("nan")),
                done,
                config.trials,
            )

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):  # a study from before claims existed
        if t.user_attrs.get("measured") and not t.user_attrs.get("duplicate"):
            claims.claim(t.user_attrs["plan_hash"], t._trial_id)
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < config.trials:
        study.optimize(
            objective, callbacks=[MaxTrialsCallback(config.trials, states=(TrialState.COMPLETE,)), report], catch=()
        )


def _fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():  # fail_stale_trials is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


#: The quality value recorded for unmeasured plans outside the bits window.
_OUTSIDE = 1e12


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, state, source, bits, measured quality, plan hash, params.

    ``measured`` is False for plans outside the bits window (their objective value is a
    placeholder); ``duplicate`` is True when the study already held the plan's measurement;
    ``retry_of`` is the trial a heartbeat-failed trial retries.
    """
    rows = []
    for t in study.trials:
        u = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "source": u.get("source"),
                "effective_bits": u.get("effective_bits"),
                "kl": u.get("kl"),
                "ppl": u.get("ppl"),
                "measured": u.get("measured", False),
                "duplicate": u.get("duplicate"),
                "retry_of": t.system_attrs.get("failed_trial"),
                "plan_hash": u.get("plan_hash"),
                "params": t.params,
            }
        )
    return pd.DataFrame(rows)


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


def front_seeds(
    problem, bits_per_choice: Callable[[Sequence[int]], float], lo: float, hi: float, k: int
) -> list[tuple[int, ...]]:
    """Up to ``k`` points of the proxy's Pareto front inside [lo, hi] bits, evenly spread by bits."""
    from ..solvers import pareto_front

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
    from ..solvers.lagrangian import decision_hull

    kept = []
    for i, (loss, cost) in enumerate(zip(problem.loss, problem.cost)):
        keep = set(decision_hull(loss, cost)) | {int(seed[i]) for seed in seeds}
        kept.append(sorted(keep, key=lambda j: (cost[j], loss[j], j)))
    space = Space(
        problem.decisions,
        tuple(tuple(problem.options[i][j] for j in k) for i, k in enumerate(kept)),
        tuple(problem.cost[i][k] for i, k in enumerate(kept)),
        numel,
    )
    return space, kept


def run_evolution(
    session,
    proxy: str,
    config: EvolutionConfig,
    out_dir: str | Path,
    extra_seeds: Sequence[Sequence[int]] = (),
    storage=None,
    work: bool = True,
    heartbeat: int | None = None,
) -> pd.DataFrame:
    """NSGA-II on a prepared :class:`~mpsearch.run.session.Session`, seeded from ``proxy``'s front.

    Searches each decision's proxy-hull formats (:func:`hull_space`). The study lives in
    ``storage`` (a journal file, ``out_dir/study.log`` by default, or a database URL) with
    everything a worker needs to join it (:func:`mpsearch.run.worker.run_worker`): the search
    settings, the proxy, the hull and the model's fingerprint. ``work=False`` creates and
    seeds the study and leaves the trials to workers. Writes ``trials.csv``, ``front.csv``
    (the measured Pareto front), the front's plans and ``pareto.png`` under ``out_dir``;
    running the same call again resumes.
    """
    from ..core.files import prepare_out_dir
    from ..store.storage import HEARTBEAT_S, open_storage
    from .config import config_to_dict

    out = prepare_out_dir(
        out_dir
    )  # checked by the caller before the session opened (mpsearch.core.files.check_out_dir)
    problem = session.problem(proxy)
    budget_bits = [b.total_bits(session.numel) / session.numel for b in session.budgets]
    lo = config.min_bits if config.min_bits is not None else min(budget_bits) - 0.25
    hi = config.max_bits if config.max_bits is not None else max(budget_bits) + 0.25
    config = replace(config, min_bits=lo, max_bits=hi)
    full = Space(problem.decisions, problem.options, problem.cost, session.numel)
    seeds = [tuple(int(j) for j in c) for c in extra_seeds] + front_seeds(
        problem, full.effective_bits, lo, hi, config.population
    )
    space, kept = hull_space(problem, session.numel, seeds)
    position = [{j: k for k, j in enumerate(row)} for row in kept]
    study = open_study(space, open_storage(storage or out / "study.log", heartbeat or HEARTBEAT_S), config)
    if "search" not in study.user_attrs:
        study.set_user_attr(
            "search",
            {
                "config": config_to_dict(session.config),
                "proxy": proxy,
                "kept": kept,
                "fingerprint": session.fingerprint,
            },
        )
    enqueue_seeds(study, space, config, [tuple(position[i][j] for i, j in enumerate(c)) for c in seeds])
    if work:
        run_trials(study, space, lambda c: session.measure_choice(original(kept, c)), config, session.config.progress)
    return write_study_outputs(session, study, space, kept, proxy, config, out)


def original(kept: Sequence[Sequence[int]], choice: Sequence[int]) -> tuple[int, ...]:
    """A hull-space choice as option indices of the full problem."""
    return tuple(kept[i][j] for i, j in enumerate(choice))


def write_study_outputs(
    session, study, space: Space, kept, proxy: str, config: EvolutionConfig, out: Path
) -> pd.DataFrame:
    """trials.csv, front.csv, the front's plans and pareto.png.

    Returns the trials with each one's full-problem choice."""
    from ..core.files import prepare_out_dir
    from ..report.plots import pareto_plot

    prepare_out_dir(out)
    df = trials_table(study)
    done = df[(df.state == "COMPLETE") & df.measured.astype(bool)].drop_duplicates("plan_hash")
    front = done[pareto_mask(done.effective_bits.to_numpy(), done[config.objective].to_numpy())].sort_values(
        "effective_bits"
    )
    write_tables(out, {"trials": df.drop(columns=["params"]), "front": front.drop(columns=["params"])})
    plans = {}
    for _, row in front.iterrows():
        choice = original(kept, [row.params[d] for d in space.decisions])
        plan = session.make_plan(session.formats(choice), proxy=proxy, search="nsga2", trial=int(row.trial))
        plan.metrics.update({k: row[k] for k in ("kl", "ppl") if pd.notna(row[k])})
        plans[f"nsga2-{row.effective_bits:.3f}bits-trial{int(row.trial)}"] = plan
    write_plans(out, plans)
    if len(done):
        pareto_plot(
            done.assign(method=done.source),
            out / "pareto.png",
            y=config.objective,
            title=f"NSGA-II on measured {config.objective} ({len(done)} plans measured)",
        )
    complete = [
        isinstance(p, dict) and len(p) == len(space.decisions) for p in df.params
    ]  # failed trials may be partial
    return df.assign(
        choice=[original(kept, [p[d] for d in space.decisions]) if ok else None for p, ok in zip(df.params, complete)]
    )
