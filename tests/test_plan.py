"""Plan v1: round trip, validation errors naming the key, fingerprints, precedence."""

from __future__ import annotations

import json

import pytest
import torch

from mpsearch.core.format import Format
from mpsearch.core.plan import Plan, PlanError, fingerprint
from mpsearch.quant import applied, apply, apply_, quantizable_names

from .conftest import tiny_llama

Q = "model.layers.0.self_attn.q_proj"


def explicit_plan(model, fmt=Format(3, 32)) -> Plan:
    names = [n for n in quantizable_names(model) if ".layers." in n]
    return Plan("tiny", fingerprint(model), {n: {"weight": fmt} for n in names}, {"metric": "bits", "limit": 3.5})


def test_round_trip(model, tmp_path):
    plan = explicit_plan(model)
    plan.metrics["ppl"] = 12.5
    path = plan.save(tmp_path / "p.json")
    back = Plan.load(path)
    assert back.to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["format"] == "mpsearch.core.plan/v1"


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: d.pop("format"), "'format'"),
        (lambda d: d.update(format="mpsearch.core.plan/v0"), "format"),
        (lambda d: d.pop("tensors"), "'tensors'"),
        (lambda d: d.update(model="x"), "model"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["tensors"].update({Q: {"wieght": {"bits": 4}}}), "wieght"),
        (lambda d: d["tensors"].update({Q: {"weight": {"bits": 99}}}), Q),
        (lambda d: d["tensors"].update({Q: {"weight": {"bits": 4, "group": 64}}}), "group"),
        (lambda d: d["tensors"].update({Q: {"weight": {"group_size": 64}}}), "bits"),
        (lambda d: d["tensors"].update({"re:(": {"weight": {"bits": 4}}}), "regex"),
        (lambda d: d.update(metrics=[1]), "metrics"),
    ],
)
def test_validation_errors_name_the_key(model, tmp_path, mutate, needle):
    d = explicit_plan(model).to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=needle.replace("(", r"\(")):
        Plan.load(path)


def test_not_json(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "x.json")


def test_fingerprint_mismatch_is_refused(model):
    other = tiny_llama(layers=3)
    plan = explicit_plan(model)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PlanError, match="wrong model"):
        apply_(other, plan)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_fingerprint_ignores_values_but_not_shapes():
    assert fingerprint(tiny_llama(seed=0)) == fingerprint(tiny_llama(seed=1))
    assert fingerprint(tiny_llama()) != fingerprint(tiny_llama(hidden=32, intermediate=64))


def test_unknown_tensor_name(model):
    plan = Plan("tiny", fingerprint(model), {"model.layers.9.mlp.up_proj": {"weight": Format(4)}})
    with pytest.raises(PlanError, match="layers.9"):
        apply_(model, plan)


def test_precedence_exact_then_first_pattern_then_default(model):
    plan = Plan(
        "tiny",
        fingerprint(model),
        {
            "_default": {"weight": Format(8)},
            r"re:.*\.mlp\..*": {"weight": Format(4)},
            r"re:.*down_proj": {"weight": Format(2)},  # later pattern: loses to the mlp one
            "model.layers.1.mlp.down_proj": {"weight": Format(3)},  # exact wins
        },
    )
    r = plan.resolve(quantizable_names(model)).weight_formats()
    assert r["model.layers.0.mlp.down_proj"].bits == 4
    assert r["model.layers.1.mlp.down_proj"].bits == 3
    assert r[Q].bits == 8
    assert r["lm_head"].bits == 8  # _default reaches every 2-D weight


def test_unmatched_pattern_and_unresolved_save_are_errors(model, tmp_path):
    plan = Plan("tiny", fingerprint(model), {"re:nothing.*": {"weight": Format(4)}})
    with pytest.raises(PlanError, match="match no tensor"):
        plan.resolve(quantizable_names(model))
    with pytest.raises(PlanError, match="resolve"):
        plan.save(tmp_path / "p.json")


def test_apply_changes_only_planned_weights(model):
    plan = Plan("tiny", fingerprint(model), {Q: {"weight": Format(2, 32)}})
    q = apply(model, plan)
    sd0, sd1 = model.state_dict(), q.state_dict()
    changed = {k for k in sd0 if not torch.equal(sd0[k], sd1[k])}
    assert changed == {Q + ".weight"}


def test_applied_restores_weights(model, tokens):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with applied(model, explicit_plan(model, Format(2, 32))):
        assert not torch.equal(model.state_dict()[Q + ".weight"], before[Q + ".weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_weight_format_on_a_run_time_target_is_refused_clearly(model):
    """Inputs and the KV cache take their own quantizers (tests/test_runtime_targets.py); a weight format there names
    the target."""
    plan = Plan("tiny", fingerprint(model), {Q: {"weight": Format(4), "input": Format(8)}})
    with pytest.raises(PlanError, match=r"input: quantizer 'uniform' quantizes \['weight'\], not input"):
        apply_(model, plan)


def test_cli_reports_a_malformed_plan_in_one_line(tmp_path, capsys):
    from mpsearch.cli import main

    (tmp_path / "bad.json").write_text(
        json.dumps(
            {
                "format": "mpsearch.core.plan/v1",
                "model": {"id": "x", "fingerprint": "y"},
                "tensors": {Q: {"weight": {"bits": 4, "grop_size": 64}}},
            }
        )
    )
    assert main(["eval", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "grop_size" in err and Q in err and err.count("\n") == 1


def test_a_plan_with_an_importance_vector_saves_it_beside_and_checks_it_on_load(tmp_path):
    import torch

    from mpsearch.core.plan import Plan, PlanError

    imp = {"a": torch.rand(64), "b": torch.rand(32)}
    plan = Plan(
        "m",
        "sha256:x",
        {"a": {"weight": Format.parse("q4_0")}, "b": {"weight": Format.parse("iq4_nl")}},
        importance=imp,
    )
    path = plan.save(tmp_path / "p.json")
    side = tmp_path / "p.importance.safetensors"
    assert side.exists()
    back = Plan.load(path)
    assert set(back.importance) == {"a", "b"} and torch.equal(back.importance["a"], imp["a"])
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(64), "b": imp["b"]}, str(side))
    with pytest.raises(PlanError, match="does not match the SHA-256"):
        Plan.load(path)
    side.unlink()
    with pytest.raises(PlanError, match="importance file p.importance.safetensors is missing"):
        Plan.load(path)


def counting_checks(monkeypatch) -> list:
    """Every call of check_plan, wherever it is reached from."""
    import importlib

    apply_module = importlib.import_module("mpsearch.quant.apply")  # the package's `apply` is the function
    calls, real = [], apply_module.check_plan

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(apply_module, "check_plan", counted)
    return calls


def test_a_plan_is_checked_once_per_evaluation(tiny_run, monkeypatch):
    """evaluate_plan checks the plan before the reference pass and passes the checked plan on
    (it was checked three times: evaluate_plan, applied and apply_, each hashing every weight)."""
    from mpsearch.models import load_model
    from mpsearch.run.evaluation import evaluate_plan

    cfg = tiny_run()
    model = load_model(cfg.model).model
    plan = Plan("tiny", fingerprint(model), {"_default": {"weight": Format(3, 32)}})
    calls = counting_checks(monkeypatch)
    got = evaluate_plan(plan, cfg.model, cfg.evaluation, seq_len=32, chunks=2, progress=False, device="cpu")
    assert len(calls) == 1 and got["plan"]["kl"] > 0
    calls.clear()
    with applied(model, plan):  # applied alone: once too
        pass
    assert len(calls) == 1


def test_a_plan_checked_against_one_model_is_refused_by_another(model):
    from mpsearch.quant.apply import CheckedPlan

    checked = CheckedPlan.of(model, explicit_plan(model, Format(2, 32)))
    assert CheckedPlan.of(model, checked) is checked
    with pytest.raises(PlanError, match="another model"):
        apply_(tiny_llama(), checked)
