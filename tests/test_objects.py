"""The Python API takes objects: a user's own nn.Module and data, checked before heavy work.

Two models a researcher might bring: a conv net with depthwise convolutions (a classifier)
and a small causal LM of their own (a plain module whose forward returns logits), plus a
transformers LM built from a config. Each goes through ``mpsearch.search(model=, data=)``.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import mpsearch
from mpsearch.models.batches import LabelledBatches
from mpsearch.models.data import DataError
from mpsearch.models.protocol import BatchData, ModelData, check_data
from tests.conftest import tiny_llama

FAST = dict(
    budgets=("uniform:4:-1",),  # per output channel: a depthwise fan-in is 9
    proxies=("fisher",),
    calib_chunks=2,
    gram_chunks=2,
    refine=0,
    baselines=True,
    tasks=False,
    profile=False,
    progress=False,
    device="cpu",
)


class DepthwiseNet(nn.Module):
    """MobileNet-style: a stem, two depthwise-separable blocks, a classifier."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        blocks = []
        for cin, cout in ((16, 32), (32, 32)):
            blocks += [
                nn.Conv2d(cin, cin, 3, padding=1, groups=cin),  # depthwise
                nn.BatchNorm2d(cin),
                nn.ReLU(),
                nn.Conv2d(cin, cout, 1),  # pointwise
                nn.ReLU(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TinyLM(nn.Module):
    """A causal LM of one's own: embeddings, a causal mixing layer, an MLP, a head; forward(ids) -> logits."""

    def __init__(self, vocab: int = 64, width: int = 32, length: int = 32) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.lm_out = nn.Linear(width, vocab)
        self.register_buffer("causal", torch.tril(torch.ones(length, length)) / torch.arange(1, length + 1)[:, None])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        t = ids.shape[1]
        h = h + self.mix(self.causal[:t, :t] @ h)  # mean of the positions so far: causal
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_out(h)


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    return x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()


def image_data() -> BatchData:
    return BatchData(LabelledBatches(*images(64, 0), batch_size=16), LabelledBatches(*images(48, 1), 16), "toy images")


def token_data(vocab: int = 64, length: int = 32) -> BatchData:
    g = torch.Generator().manual_seed(2)
    return BatchData(
        torch.randint(0, vocab, (6, length), generator=g), torch.randint(0, vocab, (4, length), generator=g), "toy text"
    )


def write_linear_space(tmp_path) -> str:
    path = tmp_path / "linears.toml"
    path.write_text(
        'name = "linears"\ntypes = ["Linear"]\ntargets = ["re:.*"]\n'
        '[formats]\nquantizer = "uniform"\nbits = [2, 3, 4, 8]\ngroup_sizes = [16]\nsymmetric = false\n'
        "include_full = true\n"
    )
    return str(path)


def test_depthwise_conv_net_as_an_object(tmp_path):
    net = DepthwiseNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = mpsearch.search(model=net, data=image_data(), space="cnn", out_dir=str(tmp_path / "out"), **FAST)
    table = result.table.set_index("plan")
    proxy = table.loc[table.kind == "proxy"]
    assert len(proxy) == 1 and proxy.kl.notna().all() and (proxy.kl >= 0).all()
    assert {"uniform", "proxy"} <= set(table.kind)
    plan = mpsearch.Plan.load(next((tmp_path / "out" / "plans").glob("fisher-*.json")))
    depthwise = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert depthwise and depthwise <= set(plan.tensors)  # the depthwise convolutions are decisions
    assert plan.model_id == "DepthwiseNet"
    assert plan.provenance["data"]["calibration"].startswith("toy images")
    assert plan.provenance["evaluation"]["data"] == "toy images"
    # the user's module is given back as it came: mode, gradient flags, weights
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_own_causal_lm_as_an_object(tmp_path):
    lm = TinyLM()
    out = tmp_path / "out"
    space = write_linear_space(tmp_path)
    result = mpsearch.search(
        model=lm,
        data=token_data(),
        space=space,
        out_dir=str(out),
        **{**FAST, "budgets": ("uniform:4:16",), "proxies": ("fisher", "measured_kl")},
    )
    table = result.table
    assert set(table.loc[table.kind == "proxy", "proxy"]) == {"fisher", "measured_kl"}
    assert table.loc[table.kind == "proxy", "ppl"].gt(1).all()
    plan = json.loads(next((out / "plans").glob("measured_kl-*.json")).read_text())
    assert set(plan["tensors"]) == {"mix", "up", "down", "lm_out"}
    # the KL is measured against this model's own outputs: 16 bits (fp16 rounding) is ~100x closer than 4
    full = mpsearch.search(
        model=lm, data=token_data(), space=space, out_dir=str(tmp_path / "full"), **{**FAST, "budgets": ("16",)}
    ).table
    four = table.loc[table.kind == "proxy", "kl"].min()
    assert 0 <= full.loc[full.kind == "proxy", "kl"].max() < four / 100


def test_transformers_lm_built_here_as_an_object(tmp_path):
    model = tiny_llama(layers=1)
    data = token_data(vocab=256)
    result = mpsearch.search(model=model, data=data, space="llama", out_dir=str(tmp_path / "out"), **FAST)
    assert result.table.loc[result.table.kind == "proxy", "kl"].notna().all()
    assert result.table.kl.notna().all()


class NoName:
    def calibration(self, chunks, skip=0):
        raise AssertionError("must not be asked for data: the missing name is found first")

    def evaluation(self, chunks):
        raise AssertionError("must not be asked for data")


@pytest.mark.parametrize(
    "data, error, words",
    [
        (NoName(), TypeError, "lacks name"),
        (object(), TypeError, "lacks name, calibration, evaluation"),
        (BatchData(LabelledBatches(*images(16, 0), 16), LabelledBatches(*images(16, 1), 16), ""), TypeError, "name"),
        (BatchData(torch.randint(0, 9, (4, 8)), torch.randint(0, 9, (4, 8))), ValueError, "cannot run the first"),
        (BatchData(LabelledBatches(*images(16, 0), 16), torch.randint(0, 9, (4, 8))), TypeError, "same kind"),
    ],
)
def test_bad_data_fails_before_heavy_work(tmp_path, data, error, words):
    t0 = time.perf_counter()
    with pytest.raises(error, match=words):
        mpsearch.search(model=DepthwiseNet(), data=data, space="cnn", out_dir=str(tmp_path / "out"), **FAST)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "out" / "results.csv").exists()


def test_too_few_calibration_batches_is_named(tmp_path):
    data = BatchData(LabelledBatches(*images(16, 0), 16), LabelledBatches(*images(16, 1), 16), "one batch")
    with pytest.raises(DataError, match="has 1 calibration batches; the search asks for 2"):
        mpsearch.search(model=DepthwiseNet(), data=data, space="cnn", out_dir=str(tmp_path / "out"), **FAST)


def test_objects_and_names_do_not_mix(tmp_path):
    with pytest.raises(ValueError, match="needs data="):
        mpsearch.search(model=DepthwiseNet(), space="cnn", **FAST)
    with pytest.raises(ValueError, match="data= goes with model="):
        mpsearch.search(data=image_data(), **FAST)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mpsearch.search(model=42, data=image_data(), **FAST)
    with pytest.raises(ValueError, match="takes data="):  # in a config too
        mpsearch.search(
            mpsearch.SearchConfig(evaluation="y.txt", space="cnn", **FAST), model=DepthwiseNet(), data=image_data()
        )
    with pytest.raises(ValueError, match="takes data="):
        mpsearch.search(model=DepthwiseNet(), data=image_data(), calibration="x.txt", space="cnn", **FAST)
    with pytest.raises(ValueError, match="weights-only space"):
        mpsearch.search(
            model=tiny_llama(layers=1),
            data=token_data(256),
            space="llama_wkv",
            context=64,
            decode=16,
            **{**FAST, "budgets": ("1MB",)},
        )


def test_the_protocol_is_what_the_search_checks():
    assert isinstance(image_data(), ModelData)
    assert not isinstance(NoName(), ModelData)
    check_data(image_data(), DepthwiseNet())  # the documented wrapper passes its own check
