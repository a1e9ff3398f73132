"""The docs stay findable and current: the benchmark pages match the results, the site builds
without a broken link, and the README stays a short front page."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "docs_results.py"
README = ROOT / "README.md"
DOCS = ROOT / "docs"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images outside code, less web addresses and in-page anchors."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def broken_links(path: Path) -> list[str]:
    return [t for t in relative_links(path.read_text(encoding="utf-8")) if not (path.parent / t).exists()]


def test_results_pages_are_current():
    proc = run(sys.executable, str(SCRIPT), "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_names_a_stale_page(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("docs_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "docs_results", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    out = tmp_path / "results"
    shutil.copytree(DOCS / "results", out)
    monkeypatch.setattr(mod, "OUT", out)
    assert mod.main(["--check"]) == 0
    page = out / "kv.md"
    page.write_text(page.read_text(encoding="utf-8") + "| 1 | typed by hand |\n", encoding="utf-8")
    assert mod.main(["--check"]) == 1
    assert "stale: docs/results/kv.md" in capsys.readouterr().err


def test_mkdocs_builds_strict(tmp_path):
    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    assert not missing, f"not installed: {missing}; the docs need mkdocs and mkdocs-material"
    proc = run(sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move prose to docs/"


def test_relative_links_point_to_files():
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    assert len(pages) > 10
    broken = {str(p.relative_to(ROOT)): b for p in pages if (b := broken_links(p))}
    assert not broken, broken


def test_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [web](https://x.org) [anchor](#a) `[code](nope.md)`\n[bad](nope.md#x)\n")
    assert broken_links(page) == ["nope.md"]


def test_readme_quick_start_has_its_two_commands():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Quick start\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Quick start' section"
    for command in ("bash scripts/search.sh", "bash scripts/test.sh"):
        assert command in match.group(1), f"the quick start does not name {command}"
