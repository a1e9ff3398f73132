"""``SearchConfig``: everything a search needs, checked before the model loads, and its JSON form
(what a study stores so that a worker elsewhere opens the same session)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..core import registry
from ..core.format import Format
from ..core.space import Rule
from ..models.data import BOS_CHOICES, DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from ..quant import get_quantizer
from .targets import load_runtime_proxy, runtime_proxy


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search needs; the CLI fills it from flags."""

    model: str = "smollm2"
    calibration: str = DEFAULT_CALIBRATION
    evaluation: str = DEFAULT_EVALUATION
    space: str = "llama"
    proxies: tuple[str, ...] = ("fisher",)
    budgets: tuple[str, ...] = ("uniform:3",)
    solver: str = "milp"
    rules: tuple[Rule, ...] = ()
    calib_seq_len: int = 512
    calib_chunks: int = 8
    #: calibration windows (from the start of the text, the calibration windows first) that
    #: GPTQ's Gram matrix and the ``oerr`` value are fitted on. GPTQ fits the whole [in, in]
    #: matrix and overfits a few thousand tokens: on SmolLM2's 1536-wide down_proj, 8 x 512
    #: tokens give it a larger output error on held-out text than RTN (README, "GPTQ needs
    #: clipped ranges and more calibration than the diagonal"). The refinement slice then
    #: starts after them.
    gram_chunks: int = 64
    #: Hutchinson probes per calibration sequence, and how many sequences (0 = all)
    hessian_probes: int = 2
    hessian_sequences: int = 0
    eval_seq_len: int = 512
    eval_chunks: int = 16
    #: measured refinement: plans measured per (proxy, budget) beyond the proxy plan and
    #: baselines (0: off), on refine_chunks x refine_seq_len calibration tokens after the calibration windows
    refine: int = 16
    refine_chunks: int = 4
    refine_seq_len: int = 256
    #: which windows start with the tokens the tokenizer puts in front (BOS): auto (all), none,
    #: calibration or evaluation only. Only for diagnosis: anything but auto shows the model text it never saw
    bos: str = "auto"
    #: weight the scale search of formats that take one (GGUF types) by each layer input's
    #: mean square per column, as llama.cpp does with an imatrix from the calibration text
    imatrix: bool = True
    #: memory (MB) for quantized tensors whose quantizer is slow (GPTQ, IQ3_S, weighted GGUF
    #: searches), reused across the plans a search measures; RTN is never kept
    memo_mb: int = 1024
    baselines: bool = True
    measure: bool = True
    threads: int = 2
    #: where the model computes: cpu, cuda, cuda:N or auto (cuda when available); the spelling is checked here,
    #: the device when the session opens (:func:`mpsearch.core.device.resolve_device`), still before heavy work
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs/latest"
    use_cache: bool = True
    progress: bool = True
    #: seconds between the saved states of a long primitive pass (a killed search resumes from the last one)
    checkpoint_every: float = 30.0
    #: spaces with run-time targets (:mod:`mpsearch.run.joint`): the context length a memory budget
    #: holds the KV cache at (0: no KV cache in the space), sequences per batch, tokens decoded
    #: one at a time through the cache when measuring, the run-time proxy, a MAC-weighted bound
    #: on the mean activation bits (0: none), and the allocations to make per budget
    context: int = 0
    batch: int = 1
    decode: int = 128
    runtime_proxy: str = "auto"
    act_bits: float = 0.0
    input_min_bits: int = 0
    allocations: tuple[str, ...] = ("joint", "separate")
    #: costs (:mod:`mpsearch.cost`): limits beside the budget (``latency_decode<=12ms``, ``energy<=25mJ``),
    #: the hardware profile the roofline latencies use (``local``: this machine, measured), the energy
    #: table, prompt tokens for the prefill latencies, and whether to time this machine's kernels
    #: (``measured_decode`` / ``measured_prefill``; cached per machine, model and space)
    constraints: tuple[str, ...] = ()
    hardware: str = "local"
    energy_table: str = "horowitz-45nm"
    prefill: int = 512
    profile: bool = True
    #: task accuracy (:mod:`mpsearch.measure.tasks`) of every measured plan: cloze items from the evaluation text
    #: (multiple-choice items: half as many), each with at most ``task_context`` tokens of context
    tasks: bool = True
    task_items: int = 100
    task_context: int = 64

    def __post_init__(self) -> None:
        """Everything that can be checked without the model is checked here, so a typo
        fails in a second, before the model loads (see :meth:`check`)."""
        if not self.proxies:
            raise ValueError("give at least one proxy")
        if not self.budgets:
            raise ValueError("give at least one budget")
        for name in (
            "calib_chunks",
            "gram_chunks",
            "eval_chunks",
            "calib_seq_len",
            "eval_seq_len",
            "threads",
            "hessian_probes",
            "hessian_sequences",
            "seed",
            "refine",
            "refine_chunks",
            "refine_seq_len",
            "memo_mb",
            "task_items",
            "task_context",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name, least in (
            ("calib_chunks", 1),
            ("gram_chunks", 1),
            ("eval_chunks", 1),
            ("calib_seq_len", 2),
            ("eval_seq_len", 2),
            ("refine", 0),
            ("refine_chunks", 1),
            ("refine_seq_len", 2),
            ("memo_mb", 0),
            ("task_items", 2),
            ("task_context", 8),
        ):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if (
            not isinstance(self.checkpoint_every, (int, float))
            or isinstance(self.checkpoint_every, bool)
            or not self.checkpoint_every >= 0
        ):
            raise ValueError(f"checkpoint_every must be a number of seconds >= 0, got {self.checkpoint_every!r}")
        from ..core.device import check_device_spec

        check_device_spec(self.device)
        for name, least in (("context", 0), ("batch", 1), ("decode", 1), ("input_min_bits", 0), ("prefill", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
        if self.decode > 32 and self.decode % 32:
            raise ValueError(
                "decode must be at most 32 or a multiple of 32 (blocks of 32 decoded tokens are the bootstrap "
                f"windows), got {self.decode}"
            )
        if self.context and self.decode >= self.context:
            raise ValueError(f"decode ({self.decode}) must be shorter than the context ({self.context})")
        if not isinstance(self.act_bits, (int, float)) or not 0 <= self.act_bits <= 16:
            raise ValueError(f"act_bits must be 0 (no bound) or a mean bit width up to 16, got {self.act_bits!r}")
        bad = set(self.allocations) - {"joint", "separate"}
        if not self.allocations or bad:
            raise ValueError(f"allocations must be some of 'joint', 'separate'; got {list(self.allocations)}")
        if self.hessian_probes < 1 or self.hessian_sequences < 0:
            raise ValueError(
                f"hessian_probes must be >= 1 and hessian_sequences >= 0, got {self.hessian_probes}, "
                f"{self.hessian_sequences}"
            )
        if not isinstance(self.imatrix, bool):
            raise ValueError(f"imatrix must be true or false, got {self.imatrix!r}")
        if self.bos not in BOS_CHOICES:
            raise ValueError(f"bos must be one of {', '.join(BOS_CHOICES)}, got {self.bos!r}")
        if self.calibration == self.evaluation:
            raise ValueError(
                f"calibration and evaluation data are both {self.calibration!r}: never evaluate on calibration text"
            )
        from ..models.loader import WITH_DATA

        if self.model in WITH_DATA and (self.calibration, self.evaluation) != (DEFAULT_CALIBRATION, DEFAULT_EVALUATION):
            raise ValueError(f"model {self.model!r} brings its own data; --calibration/--evaluation do not apply to it")
        self.check()

    def check(self) -> None:
        """Budgets, solver, proxies, search space and rules resolve (no model needed)."""
        from ..core.space import SearchSpace
        from ..cost import parse_budget_text
        from ..proxies import load_proxy

        for b in self.budgets:
            parse_budget_text(b)
        solver = registry.get("solver", self.solver)
        from ..cost.hardware import load_hardware
        from ..cost.model import ConstraintSpec

        for c in self.constraints:
            ConstraintSpec.parse(c)
        if self.constraints and not getattr(solver, "supports_constraints", False):
            raise ValueError(
                f"solver {self.solver!r} takes one budget; --constraint needs one that takes several (milp, brute)"
            )
        if self.hardware != "local":
            load_hardware(self.hardware)
        load_hardware(self.energy_table)
        for p in self.proxies:
            load_proxy(p)
        space = SearchSpace.from_file(self.space).with_rules(self.rules)
        if space.runtime:
            if self.constraints:
                raise ValueError(
                    f"search space {space.name!r} decides layer inputs / the KV cache too; --constraint is not "
                    "implemented for the joint problem yet (use --budget, or a weights-only space)"
                )
            check_joint(self, space)
        elif self.context or self.act_bits or self.input_min_bits:
            raise ValueError(
                f"search space {space.name!r} decides weights only: --context, --act-bits and --input-min-bits "
                "need a space with [input] or [kv_cache] (e.g. llama_wa, llama_wkv, llama_wakv)"
            )
        if not self.imatrix:
            for f in space.candidate_formats() + [r.pin for r in space.rules if r.pin is not None]:
                if get_quantizer(f.quantizer).importance_kind == "gram":
                    raise ValueError(
                        f"search space {space.source or space.name}: it offers {f.key}, which needs each layer input's "
                        "Gram matrix from the calibration data; imatrix=False (--no-imatrix) turns that off"
                    )


def config_to_dict(cfg: SearchConfig) -> dict:
    """JSON-able settings (what a study stores so that a worker elsewhere opens the same session)."""
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    out["rules"] = [
        {
            "match": r.match,
            "pin": r.pin.key if r.pin is not None else None,
            "min_bits": r.min_bits,
            "max_bits": r.max_bits,
            "exclude": r.exclude,
        }
        for r in cfg.rules
    ]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def config_from_dict(d: dict, **overrides) -> SearchConfig:
    """The inverse of :func:`config_to_dict`; unknown keys are an error naming them."""
    names = {f.name for f in fields(SearchConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(
            f"search settings name unknown fields {sorted(unknown)} (written by another mpsearch version?)"
        )
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in {**d, **overrides}.items()}
    d["rules"] = tuple(
        Rule(r["match"], Format.parse(r["pin"]) if r["pin"] else None, r["min_bits"], r["max_bits"], r["exclude"])
        for r in d.get("rules", ())
    )
    return SearchConfig(**d)


def check_joint(cfg: SearchConfig, space) -> None:
    """A joint search (a space with run-time targets), before any model loads: the budget kind
    fits the space, the proxies and bounds resolve."""
    from ..cost import parse_budget_text

    kv = space.runtime_target("kv_cache") is not None
    if kv and not cfg.context:
        raise ValueError(
            f"search space {space.name!r} decides the KV cache: give --context N, the tokens a memory budget holds"
        )
    for b in cfg.budgets:
        kind = parse_budget_text(b)[0]
        if kv and kind != "bytes":
            raise ValueError(
                f"budget {b}: with a KV cache the budget is memory, weights plus KV at --context {cfg.context}: give a "
                "size like 120MB"
            )
        if not kv and kind not in ("bits", "bytes"):
            raise ValueError(f"budget {b}: a joint search takes bits per weight (4.5) or a size (60MB)")
    load_runtime_proxy(runtime_proxy(cfg))
    if cfg.input_min_bits:
        space.with_runtime_min_bits("input", cfg.input_min_bits)
    if cfg.act_bits and space.runtime_target("input") is None:
        raise ValueError(f"--act-bits bounds the layer inputs, and search space {space.name!r} has no [input] table")
    if cfg.solver != "milp":
        raise ValueError(
            "a joint search (several targets, an activation constraint) is solved by the MILP; drop --solver"
        )
