"""``mpsearch profile-device``: this machine's roofline peaks and a measured kernel table.

Two things are measured, both cached by what they depend on:

- **Peaks** (:func:`local_hardware`): dense GEMM throughput in fp32, bf16 and int8 and the
  memory bandwidth of a large copy. They make ``local``, the hardware profile the roofline
  cost models use for this machine.
- **Kernel table** (:func:`profile_device`): for every layer shape and format of a search
  space, each kernel that runs it (:mod:`mpsearch.kernels`) timed for a decode step and for a
  prompt. Caches are flushed before every timed decode call (a 64 MB read), since in a real
  decode every weight comes from memory. The fixed part (attention, norms, LM head, Python)
  is the deployed unquantized model's decode time minus its linears' timed sum.
"""
from __future__ import annotations

import datetime
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..cache import cache_dir, content_key, read_json, write_json
from ..format import Format
from .hardware import Hardware, HardwareError, read_hardware, write_hardware

log = logging.getLogger(__name__)
SCHEMA = "device-profile/v1"
FLUSH_BYTES = 64 << 20
COLUMNS = ["kernel", "in_features", "out_features", "format", "tokens", "ms"]


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


def _median_s(fn, repeats: int, flush: torch.Tensor | None = None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.sum()  # a read: evicts the caches without leaving dirty lines for the timed call to write back
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_peaks() -> Hardware:
    """Dense GEMM peaks (2048 x 2048 x 2048) and copy bandwidth (256 MB) on this CPU."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    peak = {"fp32": 2 * n ** 3 / _median_s(lambda: a @ b, 5)}
    ab, bb = a.bfloat16(), b.bfloat16()
    peak["bf16"] = 2 * n ** 3 / _median_s(lambda: ab @ bb, 5)
    ai, bi = torch.randint(-127, 127, (n, n), dtype=torch.int8), torch.randint(-127, 127, (n, n), dtype=torch.int8)
    peak["int8"] = 2 * n ** 3 / _median_s(lambda: torch._int_mm(ai, bi), 5)
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _median_s(lambda: dst.copy_(src), 7)
    m = machine()
    when = datetime.date.today().isoformat()
    how = f"measured by `mpsearch profile-device` on {when}: {m['cpu']}, {m['cores']} threads, torch {m['torch']}"
    return Hardware(name="local", kind="cpu", description=f"this machine: {m['cpu']}, {m['cores']} threads",
                    float_type="bf16" if peak["bf16"] > peak["fp32"] else "fp32", peak=peak, bandwidth=bandwidth,
                    sources={"peak": f"{how}; median of 5 dense {n}^3 GEMMs (torch.matmul in fp32/bf16, torch._int_mm in int8)",
                             "bandwidth": f"{how}; median of 7 copies of 256 MB (bytes read + written per second)"})


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
    write_hardware(hw, path)
    return read_hardware(path)


@dataclass
class KernelTable:
    """Measured milliseconds per (kernel, layer shape, format, tokens), and the fixed part per model."""

    rows: pd.DataFrame
    fixed: dict[str, float] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)

    def timings(self, in_features: int, out_features: int, fmt: Format, tokens: int) -> dict[str, float]:
        r = self.rows
        sel = r[(r.in_features == in_features) & (r.out_features == out_features) & (r.format == fmt.key) & (r.tokens == tokens)]
        return dict(zip(sel.kernel, sel.ms))

    def ms(self, in_features: int, out_features: int, fmt: Format, tokens: int) -> float:
        """The fastest measured kernel's time; an error names what is missing."""
        t = self.timings(in_features, out_features, fmt, tokens)
        if not t:
            raise KeyError(f"the kernel table has no timing for {fmt.key} on a {in_features} -> {out_features} layer at {tokens} tokens; "
                           "run `mpsearch profile-device` with this model and space")
        return min(t.values())


def _shapes(decisions) -> dict[tuple[int, int], set[Format]]:
    out: dict[tuple[int, int], set[Format]] = {}
    for d in decisions:
        for m in d.members:
            out.setdefault((m.in_features, m.out_features), set()).update(d.formats)
    for fmts in out.values():
        fmts.add(Format.full())
    return out


def profile_device(model, decisions, tokens: tuple[int, ...] = (1, 512), context: int = 512, device: str = "cpu",
                   use_cache: bool = True, progress: bool = True, fingerprint: str = "") -> KernelTable:
    """Time every kernel on every (layer shape, format) of ``decisions`` at each token count (the
    first is a decode step), and the fixed part of ``model``'s decode step at ``context`` and of a
    prompt of ``tokens[-1]`` tokens. Cached by machine, kernels, shapes, formats and model."""
    from ..kernels import get_kernel, kernel_names, kernels_for
    from ..kernels.deploy import decode_ms, deploy, prefill_ms

    shapes = _shapes(decisions)
    kernels = {k: get_kernel(k).version for k in kernel_names()}
    spec = sorted((i, o, sorted(f.key for f in fs)) for (i, o), fs in shapes.items())
    key = content_key(SCHEMA, machine(), device, kernels, spec, tuple(tokens), context, fingerprint)
    path = cache_dir() / "profiles" / f"{key}.json"
    if use_cache:
        hit = read_json(path, key, SCHEMA)
        if hit is not None:
            return KernelTable(pd.DataFrame(hit["rows"])[COLUMNS], hit["fixed"], hit["machine"])
    jobs = [(i, o, f, k, t) for (i, o), fs in sorted(shapes.items()) for f in sorted(fs, key=lambda f: f.key)
            for k in kernels_for(f, i, device) for t in tokens]
    flush = torch.zeros(FLUSH_BYTES // 4, device=device)
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, o, f, k, t in tqdm(jobs, desc="profile kernels", disable=not progress, unit="kernel"):
            kern = get_kernel(k)
            packed = {n: v.to(device) for n, v in kern.pack(torch.randn(o, i, generator=g), f).items()}
            x = torch.randn(t, i, generator=g).to(device)
            decode = t == tokens[0]
            s = _median_s(lambda: kern.run(x, packed, f), 15 if decode else 3, flush if decode else None)
            rows.append({"kernel": k, "in_features": i, "out_features": o, "format": f.key, "tokens": t, "ms": s * 1e3})
    table = KernelTable(pd.DataFrame(rows, columns=COLUMNS), {}, machine())
    members = [m for d in decisions for m in d.members]
    full = Format.full()
    dense = deploy(model, {m.name: full for m in members}, {m.name: "dense" for m in members})
    step = decode_ms(dense, context=context, steps=16, batch=tokens[0])["median_ms"]
    prompt = prefill_ms(dense, tokens=tokens[-1])
    table.fixed = {"decode_ms": max(0.0, step - sum(table.timings(m.in_features, m.out_features, full, tokens[0])["dense"] for m in members)),
                   "prefill_ms": max(0.0, prompt - sum(table.timings(m.in_features, m.out_features, full, tokens[-1])["dense"] for m in members)),
                   "dense_decode_ms": step, "dense_prefill_ms": prompt, "context": context}
    del dense
    if use_cache:
        write_json(path, {"rows": rows, "fixed": table.fixed, "machine": table.machine}, key, SCHEMA)
    return table
