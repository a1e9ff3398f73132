"""Optuna NSGA-II on measured quality: seeding, deduplication, pruning and resume."""

from __future__ import annotations

import numpy as np
import pytest

from mpsearch.core.stats import pareto_mask
from mpsearch.run.evolution import EvolutionConfig, Space, evolve

pytest.importorskip("optuna")


def toy_space(n: int = 6) -> Space:
    bits = np.array([2.0, 3.0, 4.0, 8.0])
    return Space(
        tuple(f"d{i}" for i in range(n)), (("b2", "b3", "b4", "b8"),) * n, tuple(bits * 100 for _ in range(n)), 100 * n
    )


class CountingMeasure:
    """A stand-in for a model evaluation: deterministic, and it counts its calls per plan."""

    def __init__(self, space: Space, fail_on_call: int | None = None) -> None:
        self.space, self.calls, self.fail_on_call = space, [], fail_on_call

    def __call__(self, choice):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append(self.space.plan_hash(choice))
        kl = sum(2.0 ** (-2 * (j + 1)) * (i + 1) for i, j in enumerate(choice))
        return {"kl": kl, "ppl": 10 * (1 + kl), "nll": kl}


def test_seeds_run_first_and_no_plan_is_measured_twice(tmp_path) -> None:
    space = toy_space()
    measure = CountingMeasure(space)
    seeds = [(0,) * 6, (3,) * 6, (0,) * 6, (1, 2, 1, 2, 1, 2)]  # one duplicate seed
    df = evolve(space, measure, tmp_path / "study.log", EvolutionConfig(trials=20, population=4), seeds, progress=False)
    assert len(df) == 20
    assert list(df["source"][:3]) == ["seed"] * 3 and set(df["source"][3:]) <= {"nsga2"}
    assert len(measure.calls) == len(set(measure.calls))  # never evaluated twice
    done = df[df.measured]
    assert set(done.plan_hash) == set(measure.calls)
    assert np.allclose(done.effective_bits[:3], [2.0, 8.0, 3.5])


def test_resumed_study_continues_without_repeating_evaluations(tmp_path) -> None:
    space, path = toy_space(), tmp_path / "study.log"
    first = CountingMeasure(space)
    evolve(space, first, path, EvolutionConfig(trials=8, population=4), [(0,) * 6], progress=False)
    second = CountingMeasure(space)
    df = evolve(space, second, path, EvolutionConfig(trials=16, population=4), [(0,) * 6], progress=False)
    assert list(df.trial) == list(range(16))
    assert not set(first.calls) & set(second.calls)  # plans measured in run 1 are answered by the study
    assert len(second.calls) == len(set(second.calls))
    again = CountingMeasure(space)
    evolve(space, again, path, EvolutionConfig(trials=16, population=4), progress=False)
    assert again.calls == []  # already complete: nothing to do


def test_interrupted_trial_is_failed_and_the_study_finishes(tmp_path) -> None:
    space, path = toy_space(), tmp_path / "study.log"
    cfg = EvolutionConfig(trials=10, population=4)
    broken = CountingMeasure(space, fail_on_call=4)
    with pytest.raises(KeyboardInterrupt):
        evolve(space, broken, path, cfg, [(0,) * 6, (3,) * 6], progress=False)
    resumed = CountingMeasure(space)
    df = evolve(space, resumed, path, cfg, progress=False)
    assert (df.state == "FAIL").sum() == 1
    assert (df.state == "COMPLETE").sum() == 10
    assert not set(broken.calls) & set(resumed.calls)


def test_plans_outside_the_window_are_never_measured(tmp_path) -> None:
    space = toy_space()
    measure = CountingMeasure(space)
    cfg = EvolutionConfig(trials=12, population=4, min_bits=3.0, max_bits=4.5)
    df = evolve(space, measure, tmp_path / "s.log", cfg, [(0,) * 6, (2,) * 6, (1,) * 6], progress=False)
    assert df.effective_bits[df.source == "seed"].tolist() == [4.0, 3.0]  # the 2-bit seed is below the window
    assert df.effective_bits[df.measured].between(3.0, 4.5).all()
    assert not df.effective_bits[~df.measured].between(3.0, 4.5).any()
    assert len(measure.calls) == df.plan_hash[df.measured].nunique()


def test_offspring_descend_from_the_seeds(tmp_path) -> None:
    """Seeds join NSGA-II's first generation, so children stay near them (random plans would not)."""
    space = toy_space(12)
    rng = np.random.default_rng(0)
    seeds = [tuple(rng.choice([0, 1, 2], 12, p=[0.3, 0.4, 0.3])) for _ in range(8)]
    inside = [s for s in seeds if 2.9 <= space.effective_bits(s) <= 3.6]
    cfg = EvolutionConfig(trials=40, population=4, min_bits=2.9, max_bits=3.6)
    df = evolve(space, CountingMeasure(space), tmp_path / "s.log", cfg, inside, progress=False)
    children = df[df.source == "nsga2"]
    assert len(children) == 40 - len(inside)
    assert children.measured.mean() >= 0.5  # random 12-decision plans land in this window ~14% of the time


def test_a_study_for_other_decisions_is_refused(tmp_path) -> None:
    path = tmp_path / "s.log"
    evolve(toy_space(4), CountingMeasure(toy_space(4)), path, EvolutionConfig(trials=2, population=2), progress=False)
    with pytest.raises(ValueError, match="other decisions"):
        evolve(
            toy_space(5), CountingMeasure(toy_space(5)), path, EvolutionConfig(trials=4, population=2), progress=False
        )


def test_pareto_mask() -> None:
    bits = np.array([3.0, 3.0, 4.0, 5.0, 4.5])
    q = np.array([1.0, 2.0, 0.5, 0.6, 0.5])
    assert pareto_mask(bits, q).tolist() == [True, False, True, False, False]


@pytest.mark.parametrize(
    "torn", [b'{"op_code": 5, "worker_id": "x", "trial_id"', b"\x00\xff garbage", b'{"op_code": 5}\n\x00\xff']
)
def test_a_torn_last_journal_line_is_cut_off_and_the_study_resumes(tmp_path, caplog, torn) -> None:
    """Issue 10 item 4: a half-written last line made the study unreadable for good."""
    space, path = toy_space(), tmp_path / "study.log"
    evolve(space, CountingMeasure(space), path, EvolutionConfig(trials=8, population=4), [(0,) * 6], progress=False)
    good = path.read_bytes()
    if torn.startswith(b'{"op_code": 5}\n'):  # a complete line that is not a valid op, then a torn one: both go
        torn = torn.replace(b'{"op_code": 5}', b"not json")
    path.write_bytes(good + torn)
    with caplog.at_level("WARNING"):
        df = evolve(space, CountingMeasure(space), path, EvolutionConfig(trials=12, population=4), progress=False)
    assert list(df.trial) == list(range(12)) and (df.state == "COMPLETE").all()
    assert "torn write" in caplog.text and str(path) in caplog.text
    assert (tmp_path / "study.log.torn").read_bytes().startswith(torn)
    assert path.read_bytes().startswith(good)


def test_a_corrupt_journal_line_before_good_ones_is_an_error_naming_it(tmp_path) -> None:
    from mpsearch.store.storage import repair_journal

    path = tmp_path / "study.log"
    path.write_bytes(b'{"a": 1}\nbroken\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2 of the study journal"):
        repair_journal(path)
