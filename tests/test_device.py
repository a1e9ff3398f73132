"""``--device``: the flag, its errors, and every pass that runs a model computing where the model is.

Without a GPU the device plumbing runs on a stand-in device (:mod:`tests.other_device`):
tensors that report another device but compute on the CPU, and refuse what CUDA refuses
(a CPU tensor meeting them in one op). A pass that forgets to move its inputs, or makes a
tensor on the CPU, fails there as on a GPU; a correct one gives the CPU's numbers bit for
bit (eager attention), so those tests compare exactly. The last test runs on a real GPU
where there is one, to the tolerances its docstring states.
"""

from __future__ import annotations

import contextlib
import copy

import pandas as pd
import pytest
import torch

import mpsearch.core.device as device_mod
from mpsearch.cli import main, parser
from mpsearch.core.device import device_parts, model_device, resolve_device
from mpsearch.core.format import Format
from mpsearch.run.search import SearchConfig
from mpsearch.store.cache import content_key, tokens_hash
from tests.conftest import tiny_llama
from tests.other_device import OTHER, OtherDevice

#: every command that runs (or loads) a model, with the arguments it needs besides --device
MODEL_COMMANDS = {
    "search": [],
    "evolve": [],
    "apply": ["plan.json", "--out", "x"],
    "eval": ["plan.json"],
    "export": ["plan.json", "--to", "gguf", "--out", "x"],
    "profile-device": [],
    "leaderboard": ["gt.csv", "--out", "x"],
    "evolve-proxy": ["gt.csv"],
}
TINY_SEARCH = [
    "--calib-chunks",
    "4",
    "--gram-chunks",
    "8",
    "--calib-seq-len",
    "32",
    "--eval-chunks",
    "2",
    "--eval-seq-len",
    "32",
    "--refine",
    "2",
    "--refine-chunks",
    "2",
    "--refine-seq-len",
    "32",
    "--no-tasks",
    "--no-profile",
    "--quiet",
]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def eager():
    """The tiny Llama with eager attention: SDPA picks its kernel by device, eager runs the same ops anywhere."""
    m = tiny_llama()
    m.set_attn_implementation("eager")
    return m


# ------------------------------------------------------------------ the flag
def test_resolve_device_cpu_auto_and_bad_specs(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # no GPU here: auto is the CPU, silently
    for bad in ("gpu", "CPU", "cuda:", "cuda:x", "", "mps"):
        with pytest.raises(ValueError, match="choose one of cpu, cuda, cuda:N, auto"):
            resolve_device(bad)


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_asking_for_a_missing_gpu_says_what_to_do(no_cuda, spec):
    with pytest.raises(ValueError) as e:
        resolve_device(spec)
    assert str(e.value) == (
        f"--device {spec}: no CUDA device is available here (torch.cuda.is_available() is False); "
        "use --device cpu or --device auto"
    )


def test_auto_picks_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        resolve_device("cuda:3")


def test_search_config_checks_the_spelling_not_the_machine(no_cuda):
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        SearchConfig(device="gpu")
    assert SearchConfig(device="cuda:1").device == "cuda:1"  # a config may be written here and opened on a GPU machine
    assert SearchConfig().device == "auto"


def test_device_parts_leave_cpu_keys_alone(eager):
    assert device_parts("cpu") == () == device_parts(torch.device("cpu")) == device_parts(eager)
    assert device_parts("cuda:1") == ("device:cuda",)


@pytest.mark.parametrize("cmd", sorted(MODEL_COMMANDS))
def test_every_model_command_takes_device(cmd):
    a = parser().parse_args([cmd, *MODEL_COMMANDS[cmd], "--device", "cuda:1"])
    assert a.device == "cuda:1"
    assert parser().parse_args([cmd, *MODEL_COMMANDS[cmd]]).device == "auto"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["search", "--device", "gpu"], "--device 'gpu' is not a device"),
        (["search", "--device", "cuda"], "--device cuda: no CUDA device is available here"),
        (["eval", "plan.json", "--device", "cuda"], "--device cuda: no CUDA device is available here"),
        (
            ["apply", "plan.json", "--out", "x", "--device", "cuda:0"],
            "--device cuda:0: no CUDA device is available here",
        ),
    ],
)
def test_device_errors_are_one_line_before_any_work(no_cuda, argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith(f"mpsearch {argv[0]}: error:")


def test_profile_device_still_refuses_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["profile-device", "--device", "cuda", "--quiet"]) == 2
    assert "profile-device times kernels on the CPU only" in capsys.readouterr().err


# --------------------------------------------------------- the CPU is as it was
def test_device_cpu_gives_the_default_search_and_its_cache(tiny_run, tmp_path, monkeypatch):
    """``--device cpu`` and the default (auto: the CPU here) give the same results, bit for bit,
    and the same cache keys: a run after the other computes nothing new."""
    cfg = tiny_run()
    data = ["--model", cfg.model, "--calibration", cfg.calibration, "--evaluation", cfg.evaluation, *TINY_SEARCH]
    cache = tmp_path / "cache-cpu"
    monkeypatch.setenv("MPSEARCH_CACHE", str(cache))
    assert main(["search", *data, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    entries = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert main(["search", *data, "--out", str(tmp_path / "again")]) == 0  # the default, on the same cache
    assert sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file()) == entries
    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "cache-default"))
    assert main(["search", *data, "--out", str(tmp_path / "default")]) == 0  # the default, computed afresh
    cpu, default = (pd.read_csv(tmp_path / d / "results.csv") for d in ("cpu", "default"))
    timed = [
        c for c in cpu if c.startswith("cost_")
    ]  # the roofline reads this machine's peaks, measured afresh per cache
    pd.testing.assert_frame_equal(cpu.drop(columns=timed), default.drop(columns=timed))
    assert (tmp_path / "default" / "stages.csv").read_text().count("move model") == 0


def test_cpu_cache_keys_are_the_keys_they_were(eager, tokens):
    """The key formulas before ``--device`` existed, spelled out: on the CPU nothing moved."""
    from mpsearch.primitives import PrimitiveSettings, compute_primitives, families, weights_hash
    from mpsearch.primitives.sensitivity import SCHEMA, kl_key

    names = ["model.layers.0.mlp.up_proj"]
    prims = compute_primitives(eager, names, tokens, {"fisher"}, use_cache=False, progress=False)
    base = content_key(weights_hash(eager), tokens_hash(tokens), sorted(names), "prims-v2")
    fam = families()["gradients"]
    assert prims.family_keys == {
        "gradients": content_key(
            base, fam.name, fam.version, {s: getattr(PrimitiveSettings(), s) for s in fam.settings}
        )
    }
    assert prims.key_for({"fisher"}) == content_key(prims.weights, [prims.family_keys["gradients"]], "")
    f = Format.parse("u3g32a")
    from mpsearch.quant import format_identity

    assert kl_key("w", tokens, [(names[0], f)]) == content_key(
        "w", tokens_hash(tokens), [(names[0], format_identity(f))], SCHEMA
    )


# --------------------------------------------------- every pass on another device
def test_primitives_on_another_device_equal_the_cpu_and_are_cached_apart(eager, tokens):
    """Every primitive family computes on the model's device, returns CPU tensors with the CPU's
    values, and is cached under its own key (a value from one device never answers the other)."""
    from mpsearch.primitives import PrimitiveSettings, compute_primitives, primitive_names

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    settings = PrimitiveSettings(hessian_probes=2, hessian_sequences=2)
    cpu = compute_primitives(eager, names, tokens, primitive_names(), progress=False, settings=settings)
    with OtherDevice():
        eager.to(OTHER)
        assert model_device(eager) == OTHER
        other = compute_primitives(eager, names, tokens, primitive_names(), progress=False, settings=settings)
        again = compute_primitives(
            eager, names, tokens, primitive_names(), progress=False, settings=settings
        )  # from the cache
    assert set(other.values) == set(cpu.values) == set(primitive_names())
    for prim, per in cpu.values.items():
        for t, v in per.items():
            for got in (other.values[prim][t], again.values[prim][t]):
                assert type(got) is torch.Tensor and got.device.type == "cpu", (prim, t)
                assert torch.equal(got, v), (prim, t)
    assert (
        other.device == "meta" and other.weights == cpu.weights
    )  # the weights' identity does not depend on the device
    assert set(other.family_keys.values()).isdisjoint(cpu.family_keys.values())
    assert other.key_for({"w"}) != cpu.key_for({"w"})  # proxy tables too, even those that read no primitive


def test_measured_kl_evaluation_and_tasks_on_another_device(eager, tokens):
    from mpsearch.core.space import SearchSpace
    from mpsearch.measure.evaluate import DecodeEvaluator, Evaluator
    from mpsearch.measure.tasks import continuation_scores
    from mpsearch.primitives.sensitivity import measured_kl

    decisions = SearchSpace.from_file("llama").build(eager)[:2]
    imp = {m.name: torch.rand(m.in_features) for d in decisions for m in d.members}
    seqs = [(tokens[0, :12].tolist(), 3), (tokens[1, :20].tolist(), 5), (tokens[2, :9].tolist(), 1)]

    def run(model):
        ev = Evaluator(tokens, progress=False).fit(model)
        dec = DecodeEvaluator(tokens, decode=8, progress=False).fit(model)
        return (
            measured_kl(model, decisions, tokens[:1, :24], weights_key="w", progress=False, importance=imp),
            ev.reference_.to_dict(),
            ev.score(model).to_dict(),
            dec.score(model).to_dict(),
            continuation_scores(model, seqs),
        )

    cpu = run(eager)
    with OtherDevice():
        other = run(eager.to(OTHER))
    pd.testing.assert_frame_equal(cpu[0], other[0])
    assert cpu[1:] == other[1:]


def test_every_weight_quantizer_on_another_device():
    """Each quantizer runs where its weight is, reading importance kept on the CPU, with the CPU's result."""
    from mpsearch.core import registry
    from mpsearch.quant import get_quantizer, quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    x = torch.randn(512, 256, generator=g)
    columns, gram = (x * x).mean(0), x.T @ x / len(x)
    done = []
    for name in registry.names("quantizer"):
        q = get_quantizer(name)
        if q.targets != ("weight",):
            continue
        fields = {"bits": 3, "group_size": 32, "symmetric": True, **dict(q.fixed)}
        for params in ((), (("outliers", 0.01),)) if "outliers" in q.params else ((),):
            fmt = Format(**fields, quantizer=name, params=params)
            for imp in (gram if q.importance_kind == "gram" else columns, None):
                if imp is None and q.importance_kind == "gram":
                    continue  # GPTQ needs its Gram matrix
                want = quantize(w, fmt, imp)
                with OtherDevice():
                    got = quantize(w.to(OTHER), fmt, imp)
                    assert got.device == OTHER, fmt.key
                    got = got.cpu()
                assert torch.equal(got, want), (fmt.key, imp is None)
            done.append(fmt.key)
    assert {"u3g32s", "gptq3g32s", "q4_k", "iq3_s", "kmeans3g32s+o1"} <= set(done)


def test_runtime_calibration_and_hooks_on_another_device(eager, tokens):
    """Activation / KV formats: calibrated on the device (results on the CPU, cached apart), applied as hooks there."""
    from mpsearch.core.plan import Plan, fingerprint
    from mpsearch.measure.evaluate import DecodeEvaluator
    from mpsearch.quant import applied
    from mpsearch.run.cached import cached_calibration

    kv, act = Format.parse("kvquant3"), Format.parse("tensor8")
    sites = {("model.layers.0.self_attn.k_proj", "k_cache"): [kv], ("model.layers.0.mlp.down_proj", "input"): [act]}

    def run(model):
        calib = cached_calibration(model, sites, tokens, "w", seed=0)
        plan = Plan(
            "tiny",
            fingerprint(model),
            {
                "model.layers.0.self_attn.k_proj": {"k_cache": kv},
                "model.layers.0.mlp.down_proj": {"input": act, "weight": Format.parse("u4g32a")},
            },
            calibration=calib,
        )
        ev = DecodeEvaluator(tokens, decode=8, progress=False).fit(model)
        with applied(model, plan):
            return calib, ev.score(model).to_dict()

    cpu_calib, cpu_q = run(eager)
    with OtherDevice():
        calib, q = run(eager.to(OTHER))
    assert cpu_calib.keys() == calib.keys() and all(
        type(v) is torch.Tensor and torch.equal(v, cpu_calib[k]) for k, v in calib.items()
    )
    assert q == cpu_q


def test_a_whole_search_on_another_device(tiny_run, monkeypatch):
    """``mpsearch.run.search`` with the model on another device: the CPU's plans and measurements
    (to fp32 rounding: SDPA picks another kernel there), and its own cache entries."""
    from mpsearch.run.search import search

    kw = dict(proxies=("fisher", "measured_kl"), budgets=("3.5",), refine=2)
    cpu = search(tiny_run(out_dir=str(tiny_run().out_dir) + "-cpu", device="cpu", **kw))
    monkeypatch.setattr("mpsearch.run.session.resolve_device", lambda spec: OTHER)
    with OtherDevice():
        other = search(tiny_run(**kw))
    a, b = cpu.table.set_index("plan"), other.table.set_index("plan")
    assert list(a.index) == list(b.index)
    for col in ("ppl", "predicted_fisher", "effective_bits"):
        pd.testing.assert_series_equal(a[col], b[col], rtol=1e-4)
    for col in ("kl", "predicted_measured_kl"):  # differences of nearly equal log-probabilities: rounding has a floor
        pd.testing.assert_series_equal(a[col], b[col], rtol=1e-3, atol=1e-6)
    assert "move model to meta" in set(other.stages.stage)
    assert all(
        p.importance is None or all(v.device.type == "cpu" for v in p.importance.values()) for p in other.plans.values()
    )


def test_cli_apply_and_eval_on_another_device(tiny_run, tmp_path, monkeypatch, capsys):
    """``apply`` quantizes on the device and writes the CPU's weights; ``eval`` measures there."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mpsearch.core.plan import Plan, fingerprint
    from mpsearch.quant.apply import check_plan

    cfg = tiny_run()
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    check_plan(
        model, Plan("tiny", fingerprint(model), {"_default": {"weight": Format.parse("u3g32a")}}), check=False
    ).save(tmp_path / "p.json")
    base = [str(tmp_path / "p.json"), "--model", cfg.model, "--quiet"]
    ev = ["--evaluation", cfg.evaluation, "--eval-chunks", "2", "--eval-seq-len", "32"]
    out = {}
    for dev in ("cpu", "other"):
        capsys.readouterr()
        if dev == "other":
            real = device_mod.resolve_device
            monkeypatch.setattr(device_mod, "resolve_device", lambda spec: OTHER if spec == "other" else real(spec))
        with OtherDevice() if dev == "other" else contextlib.nullcontext():
            assert main(["eval", *base, *ev, "--device", dev]) == 0
            out[dev] = json.loads(capsys.readouterr().out)
            assert main(["apply", *base, "--out", str(tmp_path / dev), "--device", dev]) == 0
    for part in ("plan", "reference"):  # the stand-in device runs some ops decomposed: a sum may add in another order
        for k, v in out["cpu"][part].items():
            assert out["other"][part][k] == pytest.approx(v, rel=1e-4, abs=1e-9), (part, k)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "other"))
    # (the stand-in's model.to() unties tied weights, so its folder may also hold lm_head.weight, equal to the
    # embeddings)
    assert a.keys() <= b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_forgotten_move_fails_on_the_stand_in_device(eager, tokens):
    """The stand-in refuses what CUDA refuses, so the tests above would catch a pass that forgot to move its inputs."""
    with OtherDevice():
        eager.to(OTHER)
        with pytest.raises(RuntimeError, match="same device"):
            eager(input_ids=tokens)
        with pytest.raises(RuntimeError, match="same device"):
            eager.lm_head.weight + torch.ones(eager.lm_head.weight.shape[1])
        assert eager.lm_head.weight.sum().item() == pytest.approx(float(eager.lm_head.weight.cpu().sum()))


def test_stages_record_gpu_peaks_only_once_cuda_is_in_use(monkeypatch):
    """A CPU run's stages.csv keeps its columns; on a GPU each stage gets its peak GPU memory,
    nested stages folding into the stage around them."""
    import mpsearch.core.profiling as profiling

    class FakeCuda:
        allocated = peak = 0
        syncs = 0

        def synchronize(self):
            self.syncs += 1

        def max_memory_allocated(self):
            return self.peak

        def memory_allocated(self):
            return self.allocated

        def reset_peak_memory_stats(self):
            self.peak = self.allocated

        def use(self, nbytes):
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)

    stages = profiling.Stages()
    with stages("on the cpu"):
        pass
    assert "peak_gpu_mb" not in stages.records[0]
    cuda = FakeCuda()
    monkeypatch.setattr(profiling, "_cuda_in_use", lambda: cuda)
    with stages("outer"):
        cuda.use(100e6)
        with stages("inner"):
            cuda.use(400e6)
            cuda.use(-400e6)
        cuda.use(50e6)
    with stages("after"):
        pass
    peaks = {r["stage"]: r["peak_gpu_mb"] for r in stages.records[1:]}
    assert peaks == {"inner": 500.0, "outer": 500.0, "after": 150.0}
    assert cuda.syncs == 6  # both ends of every stage: its seconds include the GPU's queued work


# ----------------------------------------------------------------- a real GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_agrees_with_the_cpu(tokens):
    _agrees_with_the_cpu(torch.device("cuda"), tokens)


def test_the_gpu_check_runs_on_the_stand_in_device(tokens):
    """The GPU test's own code, run where there is no GPU (SDPA picks another kernel on the stand-in too)."""
    with OtherDevice():
        _agrees_with_the_cpu(OTHER, tokens)


def _agrees_with_the_cpu(device: torch.device, tokens) -> None:
    """The tiny Llama on ``device`` and on the CPU (default SDPA attention: the kernels a run uses).

    Tolerances, for fp32 on both (matmuls are fp32 unless the user enabled TF32; cuDNN's TF32
    convolutions are turned off by :func:`mpsearch.core.device.exact_fp32`, not used by this model):

    - primitives from first derivatives and input statistics (fisher, grad, xtx, hinv, gram,
      synflow, the activation scalars): within 1e-4 relative plus 1e-4 of the primitive's largest
      magnitude over the tensors compared (the scale a proxy compares them on; a value that is
      pure rounding noise, such as synflow's 1e-19 on a query projection, has no scale of its own).
      GPU reductions add in another order: a few fp32 ulps per element, a few hundred at most
      through two layers;
    - the Hessian (trace, diagonal): 1e-3 of the same. The same probes on both (drawn on the
      CPU), but a double backward compounds the rounding of two passes; its standard error over
      two probes, 1e-2;
    - the counts (the quantization kernel, the outlier share): 1e-3 absolute, a few of the
      thousands of elements on a threshold may fall on the other side;
    - perplexity and KL: 1e-3 relative, KL also 1e-6 absolute. A plan's KL is a difference of two
      nearly equal log-probabilities summed over positions, so near 0 rounding dominates it;
    - a quantizer: round-to-nearest may move a weight that sits on a rounding boundary by one
      level, so at most 0.1% of the weights differ, by at most one step; GPTQ's error feedback
      carries such a flip onward, so its result is compared by its error, within 1e-2 relative.
    """
    from mpsearch.core.plan import Plan, fingerprint
    from mpsearch.core.space import SearchSpace
    from mpsearch.measure.evaluate import Evaluator
    from mpsearch.primitives import PrimitiveSettings, compute_primitives, primitive_names
    from mpsearch.primitives.sensitivity import measured_kl
    from mpsearch.quant import applied, quantize

    cpu = tiny_llama()
    gpu = copy.deepcopy(cpu).to(device)
    device_mod.exact_fp32(device)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    settings = PrimitiveSettings(hessian_probes=2)
    pc = compute_primitives(cpu, names, tokens, primitive_names(), use_cache=False, progress=False, settings=settings)
    pg = compute_primitives(gpu, names, tokens, primitive_names(), use_cache=False, progress=False, settings=settings)
    tolerance = {"htrace": 1e-3, "hdiag": 1e-3, "htrace_se": 1e-2}
    for prim, per in pc.values.items():
        scale = max(float(c.abs().max()) for c in per.values())
        for t, c in per.items():
            g = pg.values[prim][t]
            assert g.device.type == "cpu"
            if prim in ("kernel", "act_outlier"):
                torch.testing.assert_close(g, c, rtol=0, atol=1e-3, msg=f"{prim} of {t}")
                continue
            tol = tolerance.get(prim, 1e-4)
            torch.testing.assert_close(g, c, rtol=tol, atol=tol * scale, msg=f"{prim} of {t}")

    decisions = SearchSpace.from_file("llama").build(cpu)[:3]
    kc = measured_kl(cpu, decisions, tokens[:1], progress=False)
    kg = measured_kl(gpu, decisions, tokens[:1], progress=False)
    pd.testing.assert_series_equal(kc.kl, kg.kl, rtol=1e-3, atol=1e-6)

    plan = Plan("tiny", fingerprint(cpu), {"_default": {"weight": Format.parse("u3g32a")}})
    scores = []
    for model in (cpu, gpu):
        ev = Evaluator(tokens, progress=False).fit(model)
        with applied(model, plan):
            scores.append((ev.reference_, ev.score(model)))
    for a, b in zip(*scores):  # the reference, then the plan
        assert b.ppl == pytest.approx(a.ppl, rel=1e-3) and b.kl == pytest.approx(a.kl, rel=1e-3, abs=1e-6)

    w = cpu.model.layers[0].mlp.up_proj.weight.detach()
    fmt = Format.parse("u3g32a")
    qc, qg = quantize(w, fmt), quantize(w.to(device), fmt).cpu()
    step = (w.reshape(-1, 32).amax(1) - w.reshape(-1, 32).amin(1)).max() / 7
    assert (qc != qg).float().mean() <= 1e-3 and (qc - qg).abs().max() <= step * (1 + 1e-3)
    x = torch.randn(256, w.shape[1])
    gram, gfmt = x.T @ x / len(x), Format.parse("gptq3g32a")
    ec, eg = (quantize(w, gfmt, gram) - w).norm(), (quantize(w.to(device), gfmt, gram).cpu() - w).norm()
    assert float(eg) == pytest.approx(float(ec), rel=1e-2)
