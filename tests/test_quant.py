"""Quantizer properties and effective-bit accounting."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from mpsearch.core.format import PER_CHANNEL, Format, FormatError
from mpsearch.quant import quantize


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([8, 16, 32, PER_CHANNEL]),
    symmetric=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_error_within_half_step(bits, group, symmetric, seed):
    w = weights(4, 64, seed)
    fmt = Format(bits, group, symmetric)
    q = quantize(w, fmt)
    g = fmt.group_len(64)
    x, qx = w.reshape(4, 64 // g, g), q.reshape(4, 64 // g, g)
    if symmetric:
        step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
    # half a step, plus the fp16 rounding of scale and zero point
    assert ((x - qx).abs() <= step / 2 + 2e-3 * x.abs().amax(-1, keepdim=True) + 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([8, 16, 64]), seed=st.integers(0, 10_000))
def test_group_has_at_most_2_pow_bits_levels(bits, group, seed):
    w = weights(3, 64, seed)
    q = quantize(w, Format(bits, group)).reshape(3, 64 // group, group)
    for row in q.reshape(-1, group):
        assert row.unique().numel() <= 2**bits


def test_error_shrinks_with_bits():
    w = weights(64, 256, 0)
    for group in (32, 64, PER_CHANNEL):
        errs = [float(((quantize(w, Format(b, group)) - w) ** 2).sum()) for b in (2, 3, 4, 5, 6, 8)]
        assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_smaller_groups_give_smaller_error():
    w = weights(64, 256, 1)
    errs = [float(((quantize(w, Format(3, g)) - w) ** 2).sum()) for g in (32, 64, 128, PER_CHANNEL)]
    assert errs == sorted(errs)


def test_sixteen_bits_is_identity():
    w = weights(8, 64, 2)
    assert torch.equal(quantize(w, Format.full()), w)
    assert torch.equal(quantize(w, Format(16, 64)), w)


def test_constant_group_is_exact():
    w = torch.full((2, 64), 0.3125)
    assert torch.equal(quantize(w, Format(2, 32)), w)


def test_group_must_divide_input_dim():
    with pytest.raises(FormatError, match="does not divide"):
        quantize(weights(4, 48, 0), Format(4, 32))


@pytest.mark.parametrize(
    "fmt,in_features,expected",
    [
        (Format(4, 128), 4096, 4.25),  # DESIGN.md's example: fp16 scale + zero per 128
        (Format(4, 64), 4096, 4.5),
        (Format(3, 64), 576, 3.5),
        (Format(4, 64, symmetric=True), 4096, 4.25),
        (Format(4, 32), 4096, 5.0),
        (Format(4, PER_CHANNEL), 512, 4 + 32 / 512),
        (Format.full(), 576, 16.0),
    ],
)
def test_effective_bits(fmt, in_features, expected):
    assert fmt.effective_bits(in_features) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs", [dict(bits=0), dict(bits=17), dict(bits=4, group_size=0), dict(bits=4, symmetric="no"), dict(bits=2.5)]
)
def test_bad_formats_are_rejected(kwargs):
    with pytest.raises(FormatError):
        Format(**kwargs)


def test_format_dict_round_trip():
    for f in (Format(3, 64), Format(8, PER_CHANNEL, True), Format.full()):
        assert Format.from_dict(f.to_dict()) == f
