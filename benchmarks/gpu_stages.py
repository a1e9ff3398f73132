"""Benchmark: the quick start's search (scripts/search.sh: SmolLM2-135M, Fisher proxy, uniform-3-bit
budget, baselines, refinement, task accuracy, every other setting at its default) once with
``--device cpu`` and once with ``--device cuda``, each cold on its own empty cache, stage by stage.

    python benchmarks/gpu_stages.py [--threads 16] [--out benchmarks/results/gpu_stages.csv]
                                    [--no-cpu] [--allow-cpu-only] [--python .venv/bin/python]

Writes ``--out`` (default ``benchmarks/results/gpu_stages.csv``) with the columns
``device, stage, seconds, peak_mb``, one row per stage of each run (the search's own
``stages.csv``), and beside it a JSON with the machine (GPU name, CUDA and torch versions,
CPU, threads, commit), each run's command and total wall time. ``peak_mb``: on the CPU run,
the stage's peak resident memory of the process (``peak_rss_mb``); on the CUDA run, the most GPU
memory torch had allocated during the stage (``peak_gpu_mb``; 0 for the stages before the model
moves to the GPU).

Without a GPU it stops with a message and writes nothing, unless ``--allow-cpu-only`` (then the
CPU run alone is written). ``--no-cpu`` skips the CPU run (it takes the better part of an hour
at 2 threads).

What it needs: this script itself only the Python standard library, so any ``python3`` runs it.
The searches run in ``--python`` (default: the repository's ``.venv/bin/python`` if there is one,
else the interpreter running this script), which needs mpsearch and its dependencies
(``scripts/setup.sh`` makes that venv; on a GPU machine install a CUDA build of torch into it,
e.g. ``pip install torch --index-url https://download.pytorch.org/whl/cu124``), and the embedded
SmolLM2 GGUF file that setup fetches. Each run converts the model again (its cache is empty), as
``benchmarks/default_search.py`` does.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_stages.csv"
#: scripts/search.sh's search (less its --out)
SEARCH = ["search", "--proxy", "fisher", "--budget", "uniform:3"]
PROBE = """
import json, platform, torch
cuda = torch.cuda.is_available()
gpu = torch.cuda.get_device_properties(0) if cuda else None
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "cuda_available": cuda, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "gpu_memory_gb": round(gpu.total_memory / 2**30, 1) if cuda else None}))
"""


def default_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def probe(python: str) -> dict:
    """torch's view of this machine, from the interpreter that runs the searches."""
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        said = (getattr(e, "stderr", None) or "").strip().splitlines()
        detail = (
            said[-1]
            if said
            else (f"exit status {e.returncode}" if isinstance(e, subprocess.CalledProcessError) else str(e))
        )
        sys.exit(
            f"gpu_stages: {python} cannot import torch ({detail}); "
            "give --python an interpreter with mpsearch's dependencies (scripts/setup.sh makes .venv)"
        )
    return json.loads(out.strip().splitlines()[-1])


def machine(info: dict, threads: int) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if cpuinfo.exists()
        else platform.processor()
    )
    return {
        **info,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def run_search(python: str, device: str, threads: int, work: Path) -> tuple[list[dict], dict]:
    """One cold search on ``device``: its stage rows and what was run."""
    out, cache = work / f"run-{device}", work / f"cache-{device}"
    cmd = [
        python,
        "-m",
        "mpsearch.cli",
        *SEARCH,
        "--out",
        str(out),
        "--device",
        device,
        "--threads",
        str(threads),
        "--quiet",
    ]
    print(f"gpu_stages: {device}: {' '.join(cmd)} (MPSEARCH_CACHE={cache})", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "MPSEARCH_CACHE": str(cache)})
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"gpu_stages: the {device} search failed (exit status {done.returncode}); nothing written")
    with open(out / "stages.csv", newline="") as f:
        stages = list(csv.DictReader(f))
    rows = [
        {"device": device, "stage": s["stage"], "seconds": float(s["seconds"]), "peak_mb": peak_mb(s, device)}
        for s in stages
    ]
    return rows, {"device": device, "command": cmd[1:], "total_seconds": round(seconds, 1), "stages": len(rows)}


def peak_mb(stage: dict, device: str) -> float:
    """The CPU run's peak resident memory; the CUDA run's peak GPU memory (0 before CUDA started)."""
    if device == "cpu":
        return float(stage["peak_rss_mb"])
    value = stage.get("peak_gpu_mb") or ""
    return float(value) if value.strip() else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads of both runs (default 2, the search's default)"
    )
    ap.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help=f"CSV to write; the JSON goes beside it (default {DEFAULT_OUT.relative_to(ROOT)})",
    )
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU run")
    ap.add_argument(
        "--allow-cpu-only",
        action="store_true",
        help="without a GPU, run and write the CPU run alone instead of stopping",
    )
    ap.add_argument(
        "--python",
        default=default_python(),
        help="interpreter that runs the searches (default .venv/bin/python, else this one)",
    )
    a = ap.parse_args()
    if a.threads < 1:
        sys.exit("gpu_stages: --threads must be >= 1")
    info = probe(a.python)
    devices = [] if a.no_cpu else ["cpu"]
    if info["cuda_available"]:
        devices.append("cuda")
    elif not a.allow_cpu_only:
        sys.exit(
            f"gpu_stages: no CUDA device is available to {a.python} (torch {info['torch']}, "
            f"{'a CPU-only build' if not info['cuda'] else 'CUDA ' + info['cuda']}); nothing written. "
            "Run it on a GPU machine, or pass --allow-cpu-only for the CPU run alone"
        )
    else:
        print("gpu_stages: no CUDA device here: the cuda run is skipped (--allow-cpu-only)", flush=True)
    if not devices:
        sys.exit("gpu_stages: nothing to run (--no-cpu, and no CUDA device); nothing written")

    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="mpsearch-gpu-stages-") as tmp:
        for device in devices:
            r, run = run_search(a.python, device, a.threads, Path(tmp))
            rows += r
            runs.append(run)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_csv = out.with_name(f".{out.name}.tmp")
    with open(tmp_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "stage", "seconds", "peak_mb"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp_csv, out)
    meta = {
        "machine": machine(info, a.threads),
        "search": SEARCH,
        "runs": runs,
        "peak_mb": "cpu: the stage's peak resident memory (peak_rss_mb); cuda: the most GPU memory torch allocated "
        "during the stage (peak_gpu_mb), 0 before the model moved to the GPU",
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    for run in runs:
        print(f"gpu_stages: {run['device']}: {run['total_seconds']:.0f} s in all")
    print(f"gpu_stages: wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
