"""Bad input fails early and clearly: before the model loads, naming the problem (issue 10, items 5-7)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from mpsearch.cli import main, parser
from mpsearch.core.format import Format, FormatError
from mpsearch.core.plan import Plan, PlanError, fingerprint
from mpsearch.core.space import SearchSpace, SpaceError
from mpsearch.quant import apply_, quantizable_names

Q = "model.layers.0.self_attn.q_proj"


def bad_space(tmp_path, **fields) -> str:
    text = "\n".join(f"{k} = {v}" for k, v in fields.items())
    (tmp_path / "space.toml").write_text(text + "\n")
    return str(tmp_path / "space.toml")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--budget", "abc"], "cannot read budget 'abc'"),
        (["--budget", "0"], "must be a positive number"),
        (["--budget", "nan"], "must be a positive number"),
        (["--budget=-3MB"], "must be a positive number"),
        (["--budget", "uniform:0"], "uniform bits must be 1..15"),
        (["--solver", "nope"], "unknown solver 'nope'"),
        (["--calib-chunks", "0"], "calib_chunks must be >= 1"),
        (["--calib-seq-len", "1"], "calib_seq_len must be >= 2"),
        (["--eval-chunks", "0"], "eval_chunks must be >= 1"),
        (["--pin", f"{Q}=17"], "bits must be 1..16"),
        (["--min-bits", "re:((=4"], "bad regex"),
        (["--proxy", "nope"], "built-in proxies"),
    ],
)
def test_search_config_errors_before_the_model_loads(argv, needle, no_model_load, capsys):
    assert main(["search", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("mpsearch search: error:") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"targets": "['re:((']"}, "bad regex 're:(('"),
        ({"tie": "['re:(model[']"}, "bad regex"),
        ({"targets": "'re:.*'"}, "targets: expected a list"),
        ({"rules": "[{match = 're:.*', min_bits = '4'}]"}, "min_bits must be an integer"),
        ({"rules": "[{match = 're:.*', exclude = 1}]"}, "exclude must be true or false"),
        ({"formats": "{bits = [4], group_sizes = [true]}"}, "group_sizes"),
        ({"formats": "{quantizer = 'gptq5'}"}, "unknown quantizer 'gptq5'"),
    ],
)
def test_bad_space_files_fail_before_the_model_loads(fields, needle, tmp_path, no_model_load, capsys):
    assert main(["search", "--quiet", "--space", bad_space(tmp_path, **fields)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "space.toml" in err and err.count("\n") == 1, err


def test_a_config_error_takes_seconds_on_a_cold_start(tmp_path):
    """The issue's check: `mpsearch search --budget abc` (and friends) in under 15 s, before the model loads."""
    space = bad_space(tmp_path, targets="['re:((']")
    for argv in (["--budget", "abc"], ["--solver", "nope"], ["--space", space], ["--calib-chunks", "0"]):
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "mpsearch.cli", "search", "--quiet", *argv],
            capture_output=True,
            text=True,
            env={"MPSEARCH_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert time.time() - t0 < 15
    assert not (tmp_path / "cache" / "models").exists()


def test_budget_above_what_the_space_can_use_says_so(tiny_run, caplog):
    from mpsearch.run.search import search

    with caplog.at_level("WARNING"):
        res = search(tiny_run(budgets=("20",), measure=False, baselines=False))
    assert "exceeds what the search space can use" in caplog.text and "at most 16.0000" in caplog.text
    assert res.plans["fisher-milp@20"].metrics["effective_bits"] == pytest.approx(16.0)


def test_baselines_honour_pins(tiny_run):
    from mpsearch.run.search import search

    res = search(
        tiny_run(
            measure=False,
            rules=(__import__("mpsearch.core.space", fromlist=["Rule"]).Rule(match=Q, pin=Format.full()),),
        )
    )
    for name in ("uniform-u3g64a", "recipe@uniform:3"):
        assert res.plans[name].tensors[Q]["weight"].is_full, name
    assert res.plans["fisher-milp@uniform:3"].tensors[Q]["weight"].is_full


# ------------------------------------------------------------------ plans
@pytest.mark.parametrize(
    "fmt,needle",
    [
        ({"bits": 4, "group_size": True}, "group_size must be a positive integer"),
        ({"bits": 4, "params": {"junk": 1}}, "takes no params ['junk']"),
        ({"bits": 4, "quantizer": "gptq5"}, "unknown quantizer 'gptq5'"),
        ({"bits": 1, "symmetric": True}, "needs at least 2 bits"),
        ({"bits": "4"}, "bits: must be an integer"),
        ({"bits": 4, "params": {"x": [1]}}, "must map to a number"),
    ],
)
def test_plan_formats_are_strict_on_load(fmt, needle, tmp_path, model):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "format": "mpsearch.core.plan/v1",
                "model": {"id": "x", "fingerprint": fingerprint(model)},
                "tensors": {Q: {"weight": fmt}},
            }
        )
    )
    with pytest.raises(PlanError, match=needle.replace("[", r"\[").replace("]", r"\]")) as e:
        Plan.load(path)
    assert Q in str(e.value) and str(path) in str(e.value)


def test_default_reaches_only_the_search_space(model):
    """Issue 10 item 5: ``_default`` quantized the embeddings and the tied LM head."""
    plan = Plan("tiny", fingerprint(model), {"_default": {"weight": Format(2, 32)}})
    emb, down = model.model.embed_tokens.weight.clone(), model.model.layers[0].mlp.down_proj.weight.clone()
    apply_(model, plan)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, down)
    all_plan = Plan("tiny", fingerprint(model), {"_default": {"weight": Format(2, 32)}})
    apply_(model, all_plan, all_tensors=True)
    assert not torch.equal(model.model.embed_tokens.weight, emb)


def test_exact_names_still_reach_any_weight(model):
    plan = Plan("tiny", fingerprint(model), {"lm_head": {"weight": Format(2, 32)}})
    assert plan.resolve(quantizable_names(model)).weight_formats()["lm_head"].bits == 2
    before = model.lm_head.weight.clone()
    apply_(model, plan)
    assert not torch.equal(model.lm_head.weight, before)


def test_a_group_size_that_does_not_fit_names_the_tensor_before_the_reference_pass(tmp_path, monkeypatch):
    """Issue 10 item 6: group_size 100 failed without naming the tensor, after the full reference pass."""
    from mpsearch.measure import evaluate
    from mpsearch.models.loader import LoadedModel
    from mpsearch.run import evaluation

    from .conftest import tiny_llama, tiny_text, tiny_tokenizer

    m = tiny_llama(vocab=len(tiny_tokenizer()))
    monkeypatch.setattr("mpsearch.models.load_model", lambda spec: LoadedModel(m, tiny_tokenizer(), "tiny"))
    monkeypatch.setattr(
        evaluate.Evaluator, "fit", lambda *a: (_ for _ in ()).throw(AssertionError("reference pass ran"))
    )
    (tmp_path / "t.txt").write_text(tiny_text(3))
    plan = Plan("tiny", fingerprint(m), {Q: {"weight": Format(4, 100)}})
    with pytest.raises(PlanError, match=rf"{Q}.*group size 100 does not divide its input dimension 64"):
        evaluation.evaluate_plan(
            plan, model="tiny", evaluation=str(tmp_path / "t.txt"), seq_len=16, chunks=1, progress=False
        )


def test_a_binary_plan_file_is_named(tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["eval", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "binary" in err and err.count("\n") == 1


def test_cli_apply_reports_tensors_and_writes_a_loadable_model(tiny_run, tmp_path, capsys):
    """Issue 10 item 7: apply wrote a bare fp32 file that --model could not load."""
    from mpsearch.models import load_model

    model_dir = tiny_run().model
    lm = load_model(model_dir)
    plan = {
        "format": "mpsearch.core.plan/v1",
        "model": {"id": "tiny", "fingerprint": fingerprint(lm.model)},
        "tensors": {"_default": {"weight": {"bits": 4, "group_size": 32}}},
    }
    (tmp_path / "p.json").write_text(json.dumps(plan))
    assert main(["apply", str(tmp_path / "p.json"), "--model", model_dir, "--out", str(tmp_path / "q"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "applied formats to 14 tensors" in out  # 2 layers x 7 linears, not embeddings or LM head
    q = load_model(str(tmp_path / "q"))
    names = [m.name for m in SearchSpace.from_file("llama").members(q.model)]
    qmods, omods = dict(q.model.named_modules()), dict(lm.model.named_modules())
    assert all(not torch.equal(qmods[n].weight, omods[n].weight) for n in names)
    assert torch.equal(q.model.model.embed_tokens.weight, lm.model.model.embed_tokens.weight)


def test_format_errors_are_format_errors():
    with pytest.raises(FormatError):
        Format(4, group_size=False)


def test_space_types_are_checked():
    with pytest.raises(SpaceError, match="bits"):
        SearchSpace.from_dict({"formats": {"bits": [True]}})


# ------------------------------------------------------------------ small things
def test_highs_prints_nothing_unless_asked():
    """Issue 10 item 7: the HiGHS banner reached stdout under --quiet."""
    code = (
        "import numpy as np, scipy.sparse as sp\nfrom mpsearch.solvers.milp import _run_highs\n"
        "status, x = _run_highs(np.array([1.0, 0.0]), sp.csr_matrix(np.ones((1, 2))), np.ones(1), np.ones(1), {}, "
        "False)\n"
        "print(status, x.tolist())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout == "optimal [0.0, 1.0]\n", r.stdout


def test_every_flag_has_help_and_shows_its_default():
    p = parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    for cmd, sp in sub.choices.items():
        for a in sp._actions:
            if a.dest == "help":
                continue
            assert a.help, f"{cmd} {a.option_strings or a.dest} has no help text"
            shows = a.default in (None, False, [], argparse_suppress()) or "default" in a.help or a.required
            assert shows, f"{cmd} {a.option_strings}: the help does not show the default {a.default!r}"


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def test_results_csv_grows_as_plans_are_measured(tiny_run, monkeypatch):
    """Issue 10 item 7: a search stopped while measuring left no results."""
    from mpsearch.run.search import search
    from mpsearch.run.session import Session

    real, calls = Session.measure, []

    def measure_then_stop(self, plan, desc="eval", evaluator=None):
        if evaluator is None:  # the final measurements, not the refinement's
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(desc)
        return real(self, plan, desc, evaluator)

    monkeypatch.setattr(Session, "measure", measure_then_stop)
    cfg = tiny_run()
    with pytest.raises(KeyboardInterrupt):
        search(cfg)
    table = pd.read_csv(f"{cfg.out_dir}/results.csv")
    assert len(table) == 3 and table.ppl.notna().all()  # the reference and the two plans measured


def test_evolve_summary_counts_killed_trials_as_failed():
    from mpsearch.cli import trial_summary

    df = pd.DataFrame(
        {
            "state": ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"],
            "measured": [True, True, False, None],
            "duplicate": [False, True, False, None],
        }
    )
    assert trial_summary(df) == (
        "4 trials: 1 plans measured, 1 repeats answered from the study, "
        "1 outside the bits window (not measured), 1 failed or interrupted"
    )


def test_evolve_takes_a_study_name():
    a = parser().parse_args(["evolve", "--study-name", "fisher-study"])
    assert a.study_name == "fisher-study"
