"""The caches tell the truth: keys cover every input, and corrupt entries heal themselves.

Whole searches run on a saved tiny Llama with a character tokenizer (``tiny_run``).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from mpsearch.run.search import search
from mpsearch.store import cache
from mpsearch.store.cache import cache_dir, content_key, read_json, tokens_hash, write_json

from .conftest import tiny_llama, tiny_tokenizer

MEASURED = ["predicted_fisher", "ppl", "kl", "nll", "eval_tokens", "effective_bits"]


def measured(res) -> pd.DataFrame:
    cols = [c for c in MEASURED + ["predicted_measured_kl"] if c in res.table]
    return res.table.set_index("plan")[cols]


def test_tokens_hash_covers_the_shape():
    t = torch.arange(512)
    assert tokens_hash(t.reshape(4, 128)) != tokens_hash(t.reshape(2, 256))
    assert tokens_hash(t.reshape(4, 128)) != tokens_hash(t.reshape(4, 128).to(torch.int32))
    assert tokens_hash(t.reshape(4, 128)) == tokens_hash(t.clone().reshape(4, 128))


def test_same_first_tokens_other_windows_give_other_tables_and_evaluations(tiny_run):
    """Issue 10 item 1: 4 x 32 then 2 x 64 of the same tokens reused the first run's everything."""
    a = search(tiny_run(calib_chunks=4, calib_seq_len=32, eval_chunks=4, eval_seq_len=16))
    b = search(tiny_run(calib_chunks=2, calib_seq_len=64, eval_chunks=2, eval_seq_len=32))
    assert not np.allclose(a.proxy_tables["fisher"].predicted, b.proxy_tables["fisher"].predicted)
    ref_a, ref_b = (r.table.set_index("plan") for r in (a, b))
    plan = "uniform-u3g64a"
    assert ref_a.loc[plan, "eval_tokens"] == 4 * 15 and ref_b.loc[plan, "eval_tokens"] == 2 * 31
    assert ref_a.loc[plan, "ppl"] != ref_b.loc[plan, "ppl"]
    assert len(list((cache_dir() / "primitives").glob("*.safetensors"))) == 2


def test_no_measure_searches_differing_only_in_windows_differ(tiny_run):
    """The issue's check: two --no-measure searches that differ only in the calibration windows."""
    a = search(tiny_run(calib_chunks=4, calib_seq_len=32, measure=False))
    b = search(tiny_run(calib_chunks=2, calib_seq_len=64, measure=False))
    assert not a.proxy_tables["fisher"].predicted.equals(b.proxy_tables["fisher"].predicted)


def test_each_proxy_table_is_keyed_by_its_own_proxy(tiny_run, monkeypatch):
    """--proxy fisher after --proxy fisher --proxy input_moment reuses the cached fisher table."""
    search(tiny_run(proxies=("fisher", "input_moment"), measure=False))
    import mpsearch.proxies.table as table

    def fail(*a, **k):
        raise AssertionError("the fisher table was computed again")

    monkeypatch.setattr(table, "proxy_tables", fail)
    search(tiny_run(proxies=("fisher",), measure=False))


# ------------------------------------------------------------------ corrupt entries
def truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def random_bytes(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def empty(path):
    path.write_bytes(b"")


def incomplete(path):
    """Valid header and checksum around a body that lacks part of the value."""
    if path.suffix == ".safetensors":
        state = cache.load_tensors(path, _meta_key(path))
        drop = sorted(state)[0]
        cache.save_tensors(path, {k: v for k, v in state.items() if k != drop}, _meta_key(path))
        return
    head, _, body = path.read_bytes().partition(b"\n")
    header = json.loads(head)
    if path.suffix == ".csv":
        lines = body.decode().splitlines()
        cache.write_entry(path, ("\n".join(lines[: len(lines) // 2]) + "\n").encode(), header["key"], header["schema"])
    elif path.parent.name == "evals":
        cache.write_json(path, {"ppl": 1.0}, header["key"], header["schema"])
    else:  # measured KL: a valid partial run, which the next run completes
        rows = json.loads(body)
        cache.write_json(path, rows[: len(rows) // 2], header["key"], header["schema"])


def _meta_key(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["key"]


@pytest.mark.parametrize(
    "folder,pattern",
    [
        ("primitives", "*.safetensors"),
        ("tables", "*.csv"),
        ("evals", "*.json"),
        ("sensitivity", "*.json"),
    ],
)
def test_every_corrupt_cache_entry_is_named_removed_and_recomputed(tiny_run, caplog, folder, pattern):
    cfg = tiny_run(proxies=("fisher", "measured_kl"))
    first = measured(search(cfg))
    files = sorted((cache_dir() / folder).glob(pattern))
    assert files
    for corrupt in (truncate, random_bytes, empty, incomplete):
        for f in files:
            corrupt(f)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mpsearch"):
            again = measured(search(cfg))
        pd.testing.assert_frame_equal(again, first, rtol=1e-9)
        if corrupt is not incomplete or folder != "sensitivity":  # a partial KL run is resumed, not discarded
            warned = " ".join(r.getMessage() for r in caplog.records)
            assert all(str(f) in warned for f in files), (corrupt.__name__, warned)
        assert sorted((cache_dir() / folder).glob(pattern)) == files  # healed in place


def test_a_bare_empty_object_or_nan_evaluation_is_never_served(tiny_run):
    """Issue 10 item 2: ``{}`` in an evaluation entry gave NaN ppl/KL in results.csv."""
    cfg = tiny_run()
    first = measured(search(cfg))
    for f in (cache_dir() / "evals").glob("*.json"):
        f.write_text("{}")
    assert measured(search(cfg)).equals(first)
    for f in (cache_dir() / "evals").glob("*.json"):
        header = json.loads(f.read_bytes().partition(b"\n")[0])
        body = json.dumps({"ppl": float("nan"), "kl": float("nan"), "nll": float("nan"), "eval_tokens": 62}).encode()
        cache.write_entry(f, body, header["key"], header["schema"])
    again = measured(search(cfg))
    assert again.equals(first) and np.isfinite(again[["ppl", "kl"]].to_numpy()).all()


def test_json_entry_checks_key_and_checksum(tmp_path, caplog):
    p = tmp_path / "e.json"
    write_json(p, {"a": 1}, "k1", "s")
    assert read_json(p, "k1", "s") == {"a": 1}
    assert read_json(p, "k2", "s") is None and not p.exists()  # another key's value is never served
    write_json(p, {"a": 1}, "k1", "s")
    p.write_bytes(p.read_bytes().replace(b'"a": 1', b'"a": 2'))
    with caplog.at_level(logging.WARNING):
        assert read_json(p, "k1", "s") is None
    assert "checksum" in caplog.text and str(p) in caplog.text


def test_content_key_changes_with_every_part():
    assert content_key("a", 1) != content_key("a", 2) != content_key("b", 2)


# ------------------------------------------------------------------ the converted model
def converter(calls: list):
    def convert():
        calls.append(1)
        return tiny_llama(vocab=len(tiny_tokenizer())), tiny_tokenizer()

    return convert


@pytest.mark.parametrize(
    "target,corrupt",
    [
        ("model.safetensors", truncate),
        ("model.safetensors", random_bytes),
        ("model.safetensors", empty),
        ("config.json", random_bytes),
        ("config.json", empty),
        ("config.json", truncate),
        ("tokenizer/tokenizer.json", random_bytes),
    ],
)
def test_a_corrupt_converted_model_is_converted_again(target, corrupt, caplog):
    """Issue 10 item 3: a truncated model.safetensors or a garbled config.json crashed the load."""
    from mpsearch.models.loader import cached_model

    calls: list = []
    d = cache_dir() / "models" / "tiny-x"
    model, _ = cached_model(d, "x", converter(calls), torch.float32)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    cached_model(d, "x", converter(calls), torch.float32)
    assert len(calls) == 1  # served from the cache
    corrupt(d / target)
    with caplog.at_level(logging.WARNING):
        model, tok = cached_model(d, "x", converter(calls), torch.float32)
    assert len(calls) == 2 and str(d) in caplog.text
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
    assert tok("ab", add_special_tokens=False).input_ids == [67, 68]


def test_an_incomplete_converted_model_is_converted_again(caplog):
    from mpsearch.models.loader import cached_model

    calls: list = []
    d = cache_dir() / "models" / "tiny-x"
    cached_model(d, "x", converter(calls), torch.float32)
    state, meta = cache.load_tensors_and_metadata(d / "model.safetensors", "x")
    cache.save_tensors(
        d / "model.safetensors", {k: v for k, v in state.items() if "layers.1" not in k}, "x", {"files": meta["files"]}
    )  # the other files' checksums kept: only the weights are short
    with caplog.at_level(logging.WARNING):
        cached_model(d, "x", converter(calls), torch.float32)
    assert len(calls) == 2 and "do not match the config" in caplog.text


# ------------------------------------------------------------------ resuming a primitive pass
class Interrupt:
    """Wraps a decoder body's forward (one call per sequence in every family): counts calls and
    raises KeyboardInterrupt on call ``stop_at``."""

    def __init__(self, model, stop_at: int | None = None) -> None:
        self.model, self.forward, self.calls, self.stop_at = model, model.forward, 0, stop_at
        model.forward = self

    def __call__(self, *a, **k):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt("killed mid-pass")
        return self.forward(*a, **k)

    def restore(self) -> None:
        self.model.forward = self.forward


@pytest.mark.parametrize("needs", [{"fisher"}, {"xtx"}, {"htrace"}])
def test_a_killed_primitive_pass_resumes_at_the_next_sequence(model, needs):
    """Issue 10 item 7: primitive families lost every finished sequence when killed."""
    from mpsearch.primitives import PrimitiveSettings, compute_primitives

    tokens = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(3))
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    settings = PrimitiveSettings(hessian_probes=2)
    whole = compute_primitives(model, names, tokens, needs, use_cache=False, progress=False, settings=settings)

    first = Interrupt(model.model, stop_at=4)  # sequences 1-3 finish, the 4th is killed
    with pytest.raises(KeyboardInterrupt):
        compute_primitives(model, names, tokens, needs, progress=False, settings=settings, checkpoint_every=0)
    first.restore()
    assert list((cache_dir() / "primitives").glob("*.partial.safetensors"))

    second = Interrupt(model.model)
    resumed = compute_primitives(model, names, tokens, needs, progress=False, settings=settings, checkpoint_every=0)
    second.restore()
    assert second.calls == 2  # only sequences 4 and 5 run again
    for name, per in whole.values.items():
        for t, v in per.items():
            assert torch.equal(resumed.values[name][t], v), (name, t)
    assert not list((cache_dir() / "primitives").glob("*.partial.safetensors"))  # removed once the family is cached


def test_a_corrupt_cached_austen_copy_is_fetched_again(monkeypatch, tmp_path, caplog):
    """The text data heals like every other cache entry (a fake fetch stands in for apt-get)."""
    import shutil
    from pathlib import Path

    from mpsearch.models import data

    homes = [Path("/") / data._RDATA, Path.home() / ".cache" / "mpsearch" / "data" / data.DEB_PACKAGE / data._RDATA]
    real = next((h for h in homes if (h / "Rdata.rdx").exists()), None)
    if real is None:
        pytest.skip("the Jane Austen data is not installed (scripts/setup.sh fetches it)")
    ours = cache_dir() / "data" / data.DEB_PACKAGE
    fetches = []

    def fake_fetch(dest):
        fetches.append(dest)
        (dest / data._RDATA).mkdir(parents=True, exist_ok=True)
        for f in ("Rdata.rdx", "Rdata.rdb"):
            shutil.copy(real / f, dest / data._RDATA / f)
        return dest

    monkeypatch.delenv("MPSEARCH_AUSTEN_DIR", raising=False)
    monkeypatch.setattr(
        data,
        "austen_dir",
        lambda: ours / data._RDATA if (ours / data._RDATA / "Rdata.rdx").exists() else fake_fetch(ours) / data._RDATA,
    )
    data.austen_dir()
    (ours / data._RDATA / "Rdata.rdb").write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING):
        text = data.austen_novel("persuasion")
    assert text.startswith("Persuasion") or "Persuasion" in text[:200]
    assert len(fetches) == 2 and str(ours) in caplog.text


def test_the_model_identity_covers_its_config():
    from mpsearch.primitives import weights_hash

    a, b = tiny_llama(), tiny_llama()
    assert weights_hash(a) == weights_hash(b)
    b.config.rms_norm_eps = 1e-3
    assert weights_hash(a) != weights_hash(b)
    b.config.rms_norm_eps = a.config.rms_norm_eps
    b.config._name_or_path = "/somewhere/else"
    b.config.architectures = ["LlamaForCausalLM"]  # set by save_pretrained
    assert weights_hash(a) == weights_hash(b)


@pytest.mark.parametrize("corrupt", [truncate, random_bytes, empty])
def test_a_corrupt_checkpoint_is_discarded_and_the_pass_starts_over(model, corrupt, caplog):
    from mpsearch.primitives import compute_primitives

    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    names = ["model.layers.0.mlp.up_proj"]
    whole = compute_primitives(model, names, tokens, {"fisher"}, use_cache=False, progress=False)
    first = Interrupt(model.model, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        compute_primitives(model, names, tokens, {"fisher"}, progress=False, checkpoint_every=0)
    first.restore()
    (partial,) = (cache_dir() / "primitives").glob("*.partial.safetensors")
    corrupt(partial)
    second = Interrupt(model.model)
    with caplog.at_level(logging.WARNING):
        again = compute_primitives(model, names, tokens, {"fisher"}, progress=False, checkpoint_every=0)
    second.restore()
    assert second.calls == 4 and str(partial) in caplog.text  # named, removed, every sequence again
    assert torch.equal(again.fisher[names[0]], whole.fisher[names[0]])


def test_the_evaluation_key_covers_the_importance_vector_where_a_format_reads_it():
    import torch

    from mpsearch.core.format import Format
    from mpsearch.core.plan import Plan
    from mpsearch.run.cached import plan_hash

    def plan(fmt, imp):
        return Plan(
            "m", "sha256:x", {"a": {"weight": Format.parse(fmt)}}, importance=None if imp is None else {"a": imp}
        )

    one, two = torch.ones(64), torch.arange(64.0)
    assert plan_hash(plan("q4_0", one)) != plan_hash(plan("q4_0", two)) != plan_hash(plan("q4_0", None))
    assert plan_hash(plan("u4g32a", one)) == plan_hash(plan("u4g32a", two)) == plan_hash(plan("u4g32a", None))
