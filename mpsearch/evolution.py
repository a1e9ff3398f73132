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
- Plans outside the effective-bits window are pruned before any measurement.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
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
    """What the search chooses among: options per decision and their total bits."""

    decisions: tuple[str, ...]
    options: tuple[tuple[str, ...], ...]
    bits: tuple[np.ndarray, ...]  # total effective bits of each option
    numel: int  # weights over all decisions

    def effective_bits(self, choice: Sequence[int]) -> float:
        return float(sum(float(b[j]) for b, j in zip(self.bits, choice))) / self.numel

    def plan_hash(self, choice: Sequence[int]) -> str:
        body = "|".join(f"{d}={o[j]}" for d, o, j in zip(self.decisions, self.options, choice))
        return hashlib.sha256(body.encode()).hexdigest()[:20]

    def params(self, choice: Sequence[int]) -> dict[str, str]:
        """The trial parameters for a plan (used to enqueue seeds)."""
        return {d: o[j] for d, o, j in zip(self.decisions, self.options, choice)}


def journal_storage(path: str | Path):
    """The default storage: a journal file next to the run's outputs (no server, resumable)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def evolve(space: Space, measure: Measure, storage, config: EvolutionConfig = EvolutionConfig(),
           seeds: Sequence[Sequence[int]] = (), progress: bool = True) -> pd.DataFrame:
    """Run (or resume) the NSGA-II study in ``storage``; return every trial as a table.

    ``storage`` is an Optuna storage, a database URL (``sqlite:///study.db``) or a
    journal file path. ``seeds`` are plans
    (option index per decision) enqueued when the study is new.
    """
    import optuna
    from optuna.trial import TrialState

    if isinstance(storage, (str, Path)):
        url = str(storage)
        storage = optuna.storages.get_storage(url) if "://" in url else journal_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=config.population, seed=config.seed)
    study = optuna.create_study(study_name=config.study_name, storage=storage, sampler=sampler,
                                directions=["minimize", "minimize"], load_if_exists=True)
    if study.user_attrs.get("decisions") not in (None, list(space.decisions)):
        raise ValueError(f"study {config.study_name!r} in this storage searches other decisions; "
                         "use a new storage file or another study_name")
    study.set_user_attr("decisions", list(space.decisions))
    study_id = storage.get_study_id_from_name(config.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Left running by an interrupted run: its evaluation never finished.
        storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number), TrialState.FAIL)
        log.info("trial %d was interrupted; marked failed and not counted", t.number)
    if not study.trials:
        for choice in _unique(space, seeds):
            study.enqueue_trial(space.params(choice), user_attrs={"source": "seed"}, skip_if_exists=True)

    seen = {t.user_attrs["plan_hash"]: t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    index = [{o: j for j, o in enumerate(opts)} for opts in space.options]

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        choice = tuple(index[i][trial.suggest_categorical(d, list(space.options[i]))] for i, d in enumerate(space.decisions))
        bits = space.effective_bits(choice)
        key = space.plan_hash(choice)
        trial.set_user_attr("plan_hash", key)
        trial.set_user_attr("effective_bits", bits)
        if "source" not in trial.user_attrs:
            trial.set_user_attr("source", "nsga2")
        if (config.min_bits is not None and bits < config.min_bits) or (config.max_bits is not None and bits > config.max_bits):
            raise optuna.TrialPruned(f"{bits:.3f} effective bits is outside the window")
        if key in seen:
            quality, dup = {k: v for k, v in seen[key].items() if k in ("kl", "ppl", "nll")}, True
        else:
            quality, dup = measure(choice), False
        trial.set_user_attr("duplicate", dup)
        for k in ("kl", "ppl", "nll"):
            if k in quality:
                trial.set_user_attr(k, float(quality[k]))
        seen[key] = dict(trial.user_attrs)
        return float(quality[config.objective]), bits

    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    remaining = config.trials - len(done)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, show_progress_bar=progress, catch=())
    return trials_table(study)


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, state, source, bits, measured quality, plan hash, params."""
    rows = []
    for t in study.trials:
        rows.append({"trial": t.number, "state": t.state.name, "source": t.user_attrs.get("source"),
                     "effective_bits": t.user_attrs.get("effective_bits"), "kl": t.user_attrs.get("kl"),
                     "ppl": t.user_attrs.get("ppl"), "duplicate": t.user_attrs.get("duplicate"),
                     "plan_hash": t.user_attrs.get("plan_hash"), "params": t.params})
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
