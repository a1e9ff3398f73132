"""The embedded default model (SmolLM2-135M) and the Jane Austen text, end to end.

Small slices of text keep this within CI's time; the benchmark runs the full sizes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mpsearch.cli import main
from mpsearch.core.plan import Plan, PlanError
from mpsearch.models.data import NOVELS, load_text
from mpsearch.quant import apply_
from mpsearch.run.search import SearchConfig, search

from .conftest import tiny_llama

pytestmark = pytest.mark.real
SMALL = dict(calib_chunks=2, calib_seq_len=128, eval_chunks=2, eval_seq_len=128, progress=False, task_items=20)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return search(SearchConfig(proxies=("fisher", "mse"), budgets=("uniform:3",), out_dir=str(out), **SMALL))


def test_search_writes_plans_and_a_results_table(result):
    names = set(result.plans)
    assert {"fisher-milp@uniform:3", "mse-milp@uniform:3", "uniform-u3g64a", "recipe@uniform:3"} <= names
    table = pd.read_csv(result.out_dir / "results.csv")
    for col in ("plan", "effective_bits", "predicted_fisher", "predicted_mse", "ppl", "kl"):
        assert col in table.columns
    ref = table[table.kind == "reference"].iloc[0]
    for name, plan in result.plans.items():
        m = plan.metrics
        assert m["effective_bits"] <= 3.5 + 1e-9, name
        assert math.isfinite(m["ppl"]) and m["ppl"] > ref.ppl, name
        assert m["kl"] > 0, name
    # the solver's plan is optimal for its own proxy among the plans it can express
    fisher = table.set_index("plan")["predicted_fisher"]
    assert fisher["fisher-milp@uniform:3"] <= fisher["uniform-u3g64a"] + 1e-12
    # the predicted Pareto front is a lower bound that the exact plan sits on or above
    front = pd.read_csv(result.out_dir / "front_fisher.csv")
    assert front.effective_bits.is_monotonic_increasing and front.predicted.is_monotonic_decreasing
    assert fisher["fisher-milp@uniform:3"] >= np.interp(3.5, front.effective_bits, front.predicted) * (1 - 1e-9)


def test_saved_plan_loads_and_checks_its_model(result):
    path = result.out_dir / "plans" / "fisher-milp@uniform_3.json"
    plan = Plan.load(path)
    assert plan.provenance["proxy"] == "fisher" and plan.provenance["solver"] == "milp"
    assert len(plan.tensors) == 30 * 7
    with pytest.raises(PlanError, match="wrong model"):
        apply_(tiny_llama(), plan)


def test_cli_heatmap_of_a_saved_plan(result, tmp_path, capsys):
    assert (result.out_dir / "pareto.png").exists()
    path = result.out_dir / "plans" / "fisher-milp@uniform_3.json"
    assert main(["heatmap", str(path), "--out", str(tmp_path / "h.png"), "--model", "smollm2"]) == 0
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_of_a_saved_plan(result, capsys):
    path = result.out_dir / "plans" / "uniform-u3g64a.json"
    assert main(["eval", str(path), "--eval-chunks", "1", "--eval-seq-len", "64", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["ppl"] > out["reference"]["ppl"]


def test_cli_infeasible_budget_names_the_smallest_feasible(tmp_path, capsys):
    rc = main(["search", "--budget", "2.0", "--no-measure", "--quiet", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert (
        "infeasible" in err and "smallest feasible budget is 2.4375" in err
    )  # 2-bit: g64 (2.5) where in=576, g128 (2.25) on down_proj


def test_austen_novels_are_distinct_texts():
    texts = {n: load_text(f"austen:{n}").text for n in NOVELS}
    assert texts["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert len({t[:1000] for t in texts.values()}) == len(NOVELS)


def test_calibrating_on_evaluation_text_is_refused():
    with pytest.raises(ValueError, match="never evaluate on calibration text"):
        SearchConfig(calibration="austen:emma", evaluation="austen:emma")


def test_local_model_directory_and_text_file(tmp_path):
    """Any local model directory and any text file work the same way as the defaults."""
    from mpsearch.models import load_model

    lm = load_model("smollm2")
    tiny = tiny_llama(vocab=lm.tokenizer.vocab_size)
    tiny.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(load_text("austen:emma").text[:20000])
    res = search(
        SearchConfig(
            model=str(tmp_path / "tiny"),
            calibration=str(tmp_path / "calib.txt"),
            evaluation="austen:northangerabbey",
            proxies=("mse",),
            budgets=("4.0",),
            out_dir=str(tmp_path / "out"),
            **{**SMALL, "eval_chunks": 1},
        )
    )
    plan = res.plans["mse-milp@4.0"]
    assert plan.model_id == str(tmp_path / "tiny") and plan.metrics["effective_bits"] <= 4.0 + 1e-9
    assert math.isfinite(plan.metrics["ppl"])


def test_cli_evolve_resumes_where_it_stopped(tmp_path, capsys):
    """NSGA-II on the default model: a second run of the same command continues the study."""
    out = tmp_path / "evo"
    args = [
        "evolve",
        "--budget",
        "uniform:3",
        "--population",
        "4",
        "--calib-chunks",
        "2",
        "--calib-seq-len",
        "128",
        "--eval-chunks",
        "1",
        "--eval-seq-len",
        "64",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args + ["--trials", "6"]) == 0
    first = pd.read_csv(out / "trials.csv")
    assert len(first) == 6 and (first.source == "seed").sum() >= 2
    assert main(args + ["--trials", "9"]) == 0
    second = pd.read_csv(out / "trials.csv")
    assert second.trial.tolist() == list(range(9))
    pd.testing.assert_frame_equal(second.iloc[:6], first)  # earlier trials are kept as they were
    measured = second[second.measured]
    assert measured.plan_hash.duplicated().sum() == measured.duplicate.sum()  # repeats come from the study
    assert (out / "pareto.png").exists() and list((out / "plans").glob("nsga2-*.json"))


def test_every_primitive_family_and_proxy_on_the_default_model(tmp_path):
    """Hessian, synflow, activation and gradient proxies plan on SmolLM2 (measured KL is in test_sensitivity)."""
    from mpsearch.proxies import list_proxies

    proxies = tuple(p for p in list_proxies() if p != "measured_kl")
    res = search(
        SearchConfig(
            proxies=proxies,
            budgets=("uniform:4",),
            out_dir=str(tmp_path),
            measure=False,
            baselines=False,
            hessian_probes=1,
            hessian_sequences=1,
            **{**SMALL, "calib_chunks": 1},
        )
    )
    for p in proxies:
        table = res.proxy_tables[p]
        assert np.isfinite(table.predicted).all(), p
        plan = res.plans[f"{p}-milp@uniform:4"]
        assert plan.metrics["effective_bits"] <= 4.5 + 1e-9
