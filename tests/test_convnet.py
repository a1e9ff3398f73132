"""Any model, not only Llama linears: conv layers as matrices, a classifier's data, and a
whole search (CLI) on a tiny conv net."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from mpsearch.core.layers import input_rows, kind_of, matrix, set_matrix, weight_modules
from mpsearch.core.space import SearchSpace, SpaceError
from mpsearch.models.batches import LabelledBatches, as_batches
from mpsearch.models.loader import WITH_DATA, LoadedModel


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class TinyData:
    """Random images whose label is the quadrant with the largest mean: learnable, tiny."""

    name = "tiny-images"

    def __init__(self, n: int = 4096, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        q = torch.stack(
            [
                self.x[:, 0, :4, :4].mean((1, 2)),
                self.x[:, 0, :4, 4:].mean((1, 2)),
                self.x[:, 0, 4:, :4].mean((1, 2)),
                self.x[:, 0, 4:, 4:].mean((1, 2)),
            ],
            1,
        )
        self.y = q.argmax(1)

    def calibration(self, chunks: int, skip: int = 0) -> LabelledBatches:
        s = skip * 32
        return LabelledBatches(self.x[s : s + chunks * 32], self.y[s : s + chunks * 32], 32)

    def evaluation(self, chunks: int) -> LabelledBatches:
        return LabelledBatches(self.x[-512:], self.y[-512:], 512 // chunks)


def tiny_cnn_model() -> LoadedModel:
    torch.manual_seed(0)
    model = TinyCNN()
    data = TinyData()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(80):
        loss = nn.functional.cross_entropy(model(data.x[:3072]), data.y[:3072])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, None, "tiny-cnn", data=data)


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 4),
    cout=st.integers(1, 5),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    pad=st.integers(0, 1),
    two_d=st.booleans(),
)
def test_conv_input_rows_times_matrix_is_the_convolution(cin, cout, k, stride, pad, two_d):
    """The rows a conv's input becomes, times its weight matrix, are exactly its output: the
    input statistics (X^T X, GPTQ's Gram) are those of the product the quantizer's error enters."""
    torch.manual_seed(cin * 100 + cout * 10 + k)
    conv = (nn.Conv2d if two_d else nn.Conv1d)(cin, cout, k, stride=stride, padding=pad, bias=False).double()
    x = torch.randn(2, cin, *((7, 6) if two_d else (9,)), dtype=torch.float64)
    out = conv(x)  # [B, cout, *spatial]
    rows = input_rows(conv, x)
    w = matrix(conv)
    assert w.shape == (cout, cin * k ** (2 if two_d else 1))
    got = (rows @ w.T).reshape(2, -1, cout)
    assert torch.allclose(got, out.flatten(2).transpose(1, 2), atol=1e-10)


def test_matrix_round_trip_and_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = nn.Conv2d(3, 4, 3)
    m = matrix(conv).clone()
    set_matrix(conv, m * 2)
    assert torch.equal(matrix(conv), m * 2)
    c1 = Conv1D(6, 5)  # GPT-2's linear: weight [in=5, out=6]
    assert kind_of(c1).name == "Conv1D"
    assert matrix(c1).shape == (6, 5)
    x = torch.randn(3, 5)
    assert torch.allclose(input_rows(c1, x) @ matrix(c1).T + c1.bias, c1(x), atol=1e-6)
    with pytest.raises(KeyError, match="not decision layers"):
        weight_modules(TinyCNN(), ["pool"])


def test_space_selects_by_type_and_name():
    model = TinyCNN()
    space = SearchSpace.from_file("cnn")
    members = {m.name: (m.out_features, m.in_features) for m in space.members(model)}
    assert members == {"conv1": (8, 9), "conv2": (16, 72), "fc": (4, 16)}
    only_conv = SearchSpace.from_dict({"types": ["Conv2d"], "targets": ["re:conv.*"]})
    assert [m.name for m in only_conv.members(model)] == ["conv1", "conv2"]
    with pytest.raises(SpaceError, match="unknown layer type 'Conv3x'"):
        SearchSpace.from_dict({"types": ["Conv3x"]})
    with pytest.raises(SpaceError, match="no layer of types"):
        SearchSpace.from_file("llama").members(model)


def test_neither_lm_nor_classifier_is_a_clear_error():
    with pytest.raises(TypeError, match="give a loss function and data"):
        as_batches(torch.randn(4, 3))


def test_search_cli_on_a_tiny_conv_net(tmp_path, monkeypatch):
    """`mpsearch search` end to end on a conv net: primitives, proxies, MILP, plans, measured accuracy/KL."""
    from mpsearch.cli import main

    monkeypatch.setitem(WITH_DATA, "tiny-cnn", tiny_cnn_model)
    out = tmp_path / "run"
    rc = main(
        [
            "search",
            "--model",
            "tiny-cnn",
            "--space",
            "cnn",
            "--proxy",
            "fisher",
            "--proxy",
            "hawq_v2",
            "--proxy",
            "measured_kl",
            "--proxy",
            "synflow",
            "--proxy",
            "input_moment",
            "--budget",
            "4",
            "--calib-chunks",
            "4",
            "--gram-chunks",
            "4",
            "--eval-chunks",
            "2",
            "--refine",
            "4",
            "--refine-chunks",
            "2",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = pd.read_csv(out / "results.csv")
    ref = res[res.kind == "reference"].iloc[0]
    assert ref.accuracy > 0.5 and ref.kl == 0  # the tiny net learned something; KL to itself is 0
    plans = res[res.kind != "reference"]
    assert {"fisher-milp@4", "hawq_v2-milp@4", "measured_kl-milp@4", "returned@4"} <= set(plans.plan)
    assert (plans.kl >= 0).all() and plans.accuracy.between(0, 1).all()
    plan = json.loads((out / "plans" / "fisher-milp@4.json").read_text())
    assert set(plan["tensors"]) == {"conv1", "conv2", "fc"}
    assert res[res.plan == "fisher-milp@4"].effective_bits.iloc[0] <= 4 + 1e-9
    # bootstrap CIs over the evaluation windows: the budget's best plan has difference 0, the rest >= 0
    assert (plans.kl_lo <= plans.kl + 1e-12).all() and (plans.kl <= plans.kl_hi + 1e-12).all()
    assert plans.dkl_best.min() == 0 and (plans.dkl_best >= 0).all()
    assert (plans.dkl_best_lo <= plans.dkl_best + 1e-12).all() and (plans.ppl_ratio_best > 0).all()
    assert "kl_windows" not in res  # per-window values stay in the plan files
    assert len(plan["metrics"]["kl_windows"]) == 2


def test_own_data_refuses_text_flags_before_the_model_loads(monkeypatch):
    from mpsearch.run.search import SearchConfig

    def never():
        raise AssertionError("the model was loaded before the bad flag was found")

    monkeypatch.setitem(WITH_DATA, "tiny-cnn", never)
    with pytest.raises(ValueError, match="brings its own data"):
        SearchConfig(model="tiny-cnn", space="cnn", calibration="austen:emma", budgets=("4",), measure=False)


@pytest.mark.real
def test_fashion_mnist_from_debian_and_its_splits():
    """The real data: Debian's dataset-fashion-mnist (fetched once with apt-get download)."""
    from mpsearch.models.fashion import FashionData, ResNet, load_split

    x, y = load_split("test")
    assert x.shape == (10000, 1, 28, 28) and torch.equal(y.bincount(), torch.full((10,), 1000))
    assert abs(float(x.mean())) < 0.1  # normalised with the training images' statistics
    data = FashionData()
    calib, sliced = data.calibration(4), data.calibration(2, skip=4)
    assert len(calib) == 4 and calib.numel() == 512
    assert not torch.equal(sliced.batch(0)[0], calib.batch(0)[0])  # the slice comes after the calibration batches
    ev = data.evaluation(10)
    assert len(ev) == 10 and ev.numel() == 10000
    members = SearchSpace.from_file("cnn").members(ResNet())
    assert len(members) == 10 and {m.name for m in members} >= {"stem", "blocks.1.shortcut.0", "fc"}
