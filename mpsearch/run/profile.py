"""``mpsearch profile-device``: this machine's roofline peaks and a measured kernel table, and
the cost models of a search built on them (:func:`open_costs`).

The cost models (:mod:`mpsearch.cost`) compute from a hardware profile and a kernel table;
measuring this machine and caching what was measured happens here.

Two things are measured, both cached by what they depend on:

- **Peaks** (:func:`local_hardware`): dense GEMM throughput in fp32, bf16 and int8 and the
  memory bandwidth of a large copy. They make ``local``, the hardware profile the roofline
  cost models use for this machine.
- **Kernel table** (:func:`profile_device`): for every layer shape and format of a search
  space, each kernel that runs it (:mod:`mpsearch.kernels`), timed *inside the model*: the
  model is deployed with that format and kernel on every layer that offers it, and hooks
  read the clock around each layer through 8 decode steps after a prompt of ``context``
  tokens and through one forward of a prompt. So a layer's time includes what it costs
  there: its weights come from memory, the caches hold what the other layers left. The
  fixed part (attention, norms, LM head, Python) is the unquantized deployment's step less
  its layers' times in the same steps. The int8 kernels' per-channel format (``u8gcha``) is
  timed on every shape too. (Timing each kernel alone, caches flushed before each call,
  missed the deployed models' decode time by 14-44% from run to run on this machine.)
"""

from __future__ import annotations

import datetime
import logging
import platform
import statistics
import time

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.format import Format
from ..core.profiling import Stages
from ..core.space import Decision
from ..cost import BudgetError
from ..cost.hardware import Hardware, HardwareError, hardware_toml, load_hardware, read_hardware
from ..cost.measured import COLUMNS, KernelTable
from ..cost.model import ConstraintSpec, ModelShape, Workload
from ..cost.suite import CostSuite
from ..store.cache import cache_dir, cache_write, content_key, read_json, scratch_dir, write_json

log = logging.getLogger(__name__)
SCHEMA = "device-profile/v2"  # v2: kernels timed inside the model
#: timed beside a space's formats on every layer shape: the int8 kernels' format (per channel)
INT8 = Format(8, -1, False, "uniform")


def machine() -> dict:
    """What a measured table belongs to: the CPU, torch, and the thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_peaks() -> Hardware:
    """Dense GEMM peaks (2048 x 2048 x 2048) and copy bandwidth (256 MB) on this CPU."""
    n = 2048
    g = torch.Generator().manual_seed(0)  # its own: the global generator's state is the search's, measured here or not
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    peak = {"fp32": 2 * n**3 / _median_s(lambda: a @ b, 5)}
    ab, bb = a.bfloat16(), b.bfloat16()
    peak["bf16"] = 2 * n**3 / _median_s(lambda: ab @ bb, 5)
    ai, bi = (torch.randint(-127, 127, (n, n), dtype=torch.int8, generator=g) for _ in range(2))
    peak["int8"] = 2 * n**3 / _median_s(lambda: torch._int_mm(ai, bi), 5)
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _median_s(lambda: dst.copy_(src), 7)
    m = machine()
    when = datetime.date.today().isoformat()
    how = f"measured by `mpsearch profile-device` on {when}: {m['cpu']}, {m['cores']} threads, torch {m['torch']}"
    return Hardware(
        name="local",
        kind="cpu",
        description=f"this machine: {m['cpu']}, {m['cores']} threads",
        float_type="bf16" if peak["bf16"] > peak["fp32"] else "fp32",
        peak=peak,
        bandwidth=bandwidth,
        sources={
            "peak": f"{how}; median of 5 dense {n}^3 GEMMs (torch.matmul in fp32/bf16, torch._int_mm in int8)",
            "bandwidth": f"{how}; median of 7 copies of 256 MB (bytes read + written per second)",
        },
    )


def local_hardware(refresh: bool = False) -> Hardware:
    """This machine's profile, measured once (about 10 s) and cached by CPU, torch and threads."""
    path = cache_dir() / "hardware" / f"local-{content_key(SCHEMA, machine())}.toml"
    if path.is_file() and not refresh:
        try:
            return read_hardware(path)
        except (HardwareError, OSError) as e:
            log.warning("discarding unreadable cached profile %s: %s", path, e)
    log.info("measuring this machine's peak throughput and bandwidth (once; cached in %s)", path)
    hw = measure_peaks()
    text = hardware_toml(hw)
    if (
        cache_write(path, lambda tmp: tmp.write_text(text)) is None
    ):  # a read-only cache: read back from scratch all the same
        path = scratch_dir() / path.name
        path.write_text(text)
    return read_hardware(path)  # what a later run reads from the cache, to the digit


def hardware(name: str) -> Hardware:
    """A hardware profile by name or path, ``local`` (this machine, measured once) included."""
    return local_hardware() if str(name) == "local" else load_hardware(name)


def _shapes(decisions) -> dict[tuple[int, int], set[Format]]:
    out: dict[tuple[int, int], set[Format]] = {}
    for d in decisions:
        for m in d.members:
            out.setdefault((m.in_features, m.out_features), set()).update(d.formats)
    for fmts in out.values():
        fmts.add(Format.full())
    return out


def _timed(model, names: list[str], context: int, tokens: tuple[int, ...], steps: int = 8) -> tuple[dict, dict]:
    """Milliseconds of each module ``names`` inside the model: per decode step of ``tokens[0]``
    sequences after a ``context``-token prompt, and in one forward of ``tokens[-1]`` tokens; and the
    whole step's / forward's milliseconds. The clock is read by hooks around each module."""
    from transformers import DynamicCache

    times: dict[str, list[float]] = {n: [] for n in names}
    start: dict[str, float] = {}
    hooks = []
    for n in names:
        mod = model.get_submodule(n)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=n: start.__setitem__(n, time.perf_counter())))
        hooks.append(
            mod.register_forward_hook(lambda m, a, o, n=n: times[n].append((time.perf_counter() - start[n]) * 1e3))
        )
    g = torch.Generator().manual_seed(0)
    per: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    totals: dict[int, list[float]] = {}
    try:
        with torch.no_grad():
            batch, prompt = tokens[0], tokens[-1]
            ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=g)
            model(input_ids=ids[:, :8], use_cache=False)  # warm up
            for n in names:
                times[n].clear()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            totals[prompt] = [(time.perf_counter() - t0) * 1e3]
            for n in names:
                per[n][prompt], times[n] = times[n][:], []
            cache = DynamicCache()
            ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g)
            for s in range(0, context, 512):
                out = model(input_ids=ids[:, s : s + 512], past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            steps_ms = []
            for i in range(steps + 2):
                for n in names:
                    times[n].clear()
                t0 = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                if i >= 2:  # two steps to warm up
                    steps_ms.append((time.perf_counter() - t0) * 1e3)
                    for n in names:
                        per[n].setdefault(batch, []).append(times[n][-1])
            totals[batch] = steps_ms
    finally:
        for h in hooks:
            h.remove()
    return per, totals


def profile_device(
    model,
    decisions,
    tokens: tuple[int, ...] = (1, 512),
    context: int = 512,
    device: str = "cpu",
    use_cache: bool = True,
    progress: bool = True,
    fingerprint: str = "",
    refresh: bool = False,
) -> KernelTable:
    """Time every kernel on every (layer shape, format) of ``decisions`` at each token count (the
    first is a decode step), and the fixed part of ``model``'s decode step at ``context`` and of a
    prompt of ``tokens[-1]`` tokens. Cached by machine, kernels, shapes, formats and model; ``refresh``
    measures again and replaces the cached table (timings taken while the machine was busy)."""
    from ..kernels import get_kernel, kernel_names
    from ..kernels.deploy import deploy

    if device != "cpu":  # the hooks read a host clock: on a GPU they would time kernel launches, not kernels
        raise ValueError(f"profile-device times kernels on the CPU only so far; device {device!r} is not supported yet")

    shapes = _shapes(decisions)
    kernels = {k: get_kernel(k).version for k in kernel_names()}
    spec = sorted((i, o, sorted(f.key for f in fs)) for (i, o), fs in shapes.items())
    key = content_key(SCHEMA, machine(), device, kernels, spec, tuple(tokens), context, fingerprint)
    path = cache_dir() / "profiles" / f"{key}.json"
    if use_cache and not refresh:
        hit = read_json(path, key, SCHEMA)
        if hit is not None:
            return KernelTable(pd.DataFrame(hit["rows"])[COLUMNS], hit["fixed"], hit["machine"])
    members = [m for d in decisions for m in d.members]
    offered = {m.name: set(d.formats) | {Format.full(), INT8} for d in decisions for m in d.members}
    runs = [(f, k) for f in sorted(set().union(*offered.values()), key=lambda f: f.key) for k in kernel_names()]
    samples: dict[tuple, list[float]] = {}
    fixed: dict[str, list[float]] = {"decode_ms": [], "prefill_ms": []}
    for f, k in tqdm(runs, desc="profile kernels in the model", disable=not progress, unit="run"):
        on = [m for m in members if f in offered[m.name] and get_kernel(k).applies(f, m.in_features, device)]
        if not on:
            continue
        deployed = deploy(model, {m.name: f for m in on}, {m.name: k for m in on})
        per_module, totals = _timed(deployed, [m.name for m in on], context, tokens)
        for m in on:
            for t in tokens:
                samples.setdefault((k, m.in_features, m.out_features, f.key, t), []).extend(per_module[m.name][t])
        if k == "dense" and f.is_full:  # every decision linear in the model: the rest of a step is the fixed part
            for t, what in ((tokens[0], "decode_ms"), (tokens[-1], "prefill_ms")):
                fixed[what] = [tot - sum(per_module[m.name][t][i] for m in on) for i, tot in enumerate(totals[t])]
        del deployed
    rows = [
        {"kernel": k, "in_features": i, "out_features": o, "format": f, "tokens": t, "ms": statistics.median(v)}
        for (k, i, o, f, t), v in sorted(samples.items())
    ]
    table = KernelTable(
        pd.DataFrame(rows, columns=COLUMNS),
        {k: statistics.median(v) for k, v in fixed.items()} | {"context": context},
        machine(),
    )
    if use_cache:
        write_json(path, {"rows": rows, "fixed": table.fixed, "machine": table.machine}, key, SCHEMA)
    return table


def open_costs(cfg, model, decisions: list[Decision], stages: Stages | None = None, fingerprint: str = "") -> CostSuite:
    """The costs ``cfg`` asks for (``hardware``, ``energy_table``, ``prefill``, ``batch``,
    ``context``, ``profile``), this machine measured where they need it; a constraint on a cost
    that cannot be built fails here."""
    import contextlib

    stage = stages or (lambda name: contextlib.nullcontext())
    workload = Workload(batch=cfg.batch, context=cfg.context or 512, prefill=cfg.prefill)
    shape = ModelShape.of(model)
    wanted = {ConstraintSpec.parse(c).cost for c in cfg.constraints}
    with stage(f"hardware profile {cfg.hardware}"):
        hw = hardware(cfg.hardware)
    energy_hw = hardware(cfg.energy_table)
    profile = None
    timed = wanted & {"measured_decode", "measured_prefill"}
    if (cfg.profile or timed) and not shape.layers:  # the kernels run a decoder's linears; a CNN has no decode step
        if timed:
            raise BudgetError(
                f"constraints {sorted(timed)}: measured latencies are for decoder LMs (linear layers, a decode "
                "step); this model is not one"
            )
        log.info("no measured latencies: the kernel table is for decoder LMs")
    elif cfg.profile or timed:
        with stage("profile device (measured kernel table)"):
            profile = profile_device(
                model,
                decisions,
                tokens=(workload.batch, workload.batch * workload.prefill),
                context=workload.context,
                use_cache=cfg.use_cache,
                progress=cfg.progress,
                fingerprint=fingerprint,
            )
    return CostSuite.build(hw, energy_hw, workload, shape, profile)
