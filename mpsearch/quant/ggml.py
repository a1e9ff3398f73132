"""GGUF (llama.cpp) block types as quantizers: Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1,
Q4_0, Q3_K, Q2_K, IQ4_NL, IQ4_XS and IQ3_S (its lattice search in :mod:`.ggml_iq3`).

Each type has three steps, written here in torch:

- ``encode``: the weighted scale search (:mod:`.ggml_search`, llama.cpp's searches),
  the quantization of sub-block scales to their stored integers, and the final codes,
  rounded to the nearest level *given the stored scales*;
- ``decode``: the dequantized values, computed with the same float32 operations in the
  same order as ggml's dequantizers, so the simulation equals what a runtime reads;
- ``pack``: the GGML block bytes (``[blocks, type_size]`` uint8), for GGUF export.

``tests/test_ggml.py`` checks ``gguf.quants.dequantize(pack(w)) == quantize(w)``
bit for bit. Bits per weight are exact: ``type_size * 8 / block_size`` (Q4_K 4.5,
Q3_K 3.4375, Q2_K 2.625, IQ4_XS 4.25). A type fits a tensor only when its block tiles
the row (256 for k-quants, IQ4_XS and IQ3_S): on SmolLM2's 576-wide rows only the 32-blocks fit,
the same decision llama.cpp makes.

An ``importance`` vector (per input column, the imatrix) weights the error in every
search, as llama.cpp's ``quant_weights`` do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..core.format import Format, FormatError
from ..core.registry import register
from . import ggml_iq3
from . import ggml_search as S
from .quantizer import Quantizer

Codes = dict[str, torch.Tensor]
#: IQ4_NL's non-linear codebook (ggml's kvalues_iq4nl)
IQ4_VALUES = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32
)
#: elements per encode call (the searches hold ~40 candidates of each)
CHUNK = 1 << 17


@dataclass(frozen=True)
class BlockType:
    """One GGML type: its layout and its three steps."""

    name: str
    qtype: GGMLQuantizationType
    bits: int
    symmetric: bool
    encode: Callable[[torch.Tensor, torch.Tensor | None], Codes]
    decode: Callable[[Codes], torch.Tensor]
    pack: Callable[[Codes], np.ndarray]
    about: str = ""

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block


TYPES: dict[str, BlockType] = {}


# ----------------------------------------------------------------- helpers
def _f16(t: torch.Tensor) -> torch.Tensor:
    """Store as fp16 (finite: a scale beyond fp16's range is clamped to its largest value)."""
    return t.clamp(-65504.0, 65504.0).to(torch.float16)


def _div(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x / d``, 0 where ``d`` is 0."""
    return torch.where(d != 0, x / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(x))


def _bytes16(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1, 1).numpy().view(np.uint8).reshape(-1, 2)


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """``[N, 32k]`` codes 0..15 -> bytes: per 32, element i low nibble, element i+16 high."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1).numpy()


def _bitplanes(q: torch.Tensor, shift: int, width: int) -> np.ndarray:
    """Bit ``b`` of byte ``l`` is bit ``shift`` of element ``b * width + l`` (ggml's ``hmask``/``qh``)."""
    n = q.shape[0]
    bits = ((q.to(torch.int32) >> shift) & 1).reshape(n, -1, width)  # [n, planes <= 8, width]
    planes = torch.arange(bits.shape[1], dtype=torch.int32).view(1, -1, 1)
    return (bits << planes).sum(1).to(torch.uint8).numpy()


def _crumbs(q: torch.Tensor) -> np.ndarray:
    """2-bit codes of a 256 block -> 64 bytes: byte ``h*32+l`` holds elements ``h*128 + s*32 + l`` at bits ``2s``."""
    n = q.shape[0]
    q = q.to(torch.uint8).reshape(n, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64).numpy()


def _scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes holding eight 6-bit scales and eight 6-bit mins."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return torch.cat([a, b, c], 1).numpy()


def _scales_q3(s: torch.Tensor) -> np.ndarray:
    """Q3_K's 12 bytes holding sixteen 6-bit scales (stored + 32)."""
    s = s.to(torch.uint8)
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    hi = (s >> 4) & 3  # [n, 16] -> byte i holds scales 4s+i at bits 2s
    high = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    return torch.cat([low, high], 1).numpy()


def _sub(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[N, 256]`` -> ``[N * 256/n, n]`` sub-blocks."""
    return x.reshape(-1, n)


def _weights(x: torch.Tensor, imp: torch.Tensor | None, kind: str) -> torch.Tensor:
    return S.error_weights(x, imp, kind)


# ------------------------------------------------------------ simple 32-blocks
def _sym32(nmax: int, lo: int, hi: int, kind: str = "square"):
    def encode(x, imp):
        d = _f16(S.symmetric(x, _weights(x, imp, kind), nmax, lo, hi))
        q = _div(x, d.float()).round().clamp(lo, hi)
        return {"d": d, "q": q.to(torch.int16)}

    return encode


def _decode_sym(c: Codes) -> torch.Tensor:
    return c["d"].float() * c["q"].float()


def _asym32(nmax: int, rmin: float, rdelta: float, nstep: int, kind: str = "rms_abs"):
    def encode(x, imp):
        scale, m = S.asymmetric(x, _weights(x, imp, kind), nmax, rmin, rdelta, nstep)
        d, m = _f16(scale), _f16(m)
        q = _div(x - m.float(), d.float()).round().clamp(0, nmax)
        return {"d": d, "m": m, "q": q.to(torch.int16)}

    return encode


def _decode_asym(c: Codes) -> torch.Tensor:
    return (c["d"].float() * c["q"].float()) + c["m"].float()


def _pack_q8_0(c):
    return np.concatenate([_bytes16(c["d"]), c["q"].to(torch.int8).numpy().view(np.uint8)], 1)


def _pack_q4_0(c):
    return np.concatenate([_bytes16(c["d"]), _nibbles(c["q"] + 8)], 1)


def _pack_q4_1(c):
    return np.concatenate([_bytes16(c["d"]), _bytes16(c["m"]), _nibbles(c["q"])], 1)


def _qh32(u: torch.Tensor) -> np.ndarray:
    """Bit j of the little-endian uint32 is bit 4 of element j."""
    return np.packbits(((u.to(torch.int32) >> 4) & 1).to(torch.uint8).numpy(), axis=1, bitorder="little")


def _pack_q5_0(c):
    u = c["q"] + 16
    return np.concatenate([_bytes16(c["d"]), _qh32(u), _nibbles(u & 0xF)], 1)


def _pack_q5_1(c):
    return np.concatenate([_bytes16(c["d"]), _bytes16(c["m"]), _qh32(c["q"]), _nibbles(c["q"] & 0xF)], 1)


# ---------------------------------------------------------------- k-quants
def _kasym(nmax: int, sub: int, smax: int, rmin: float, rdelta: float, nstep: int, kind: str):
    """Q2_K / Q4_K / Q5_K: sub-blocks with scale and min, both quantized to ``smax``-level integers."""

    def encode(x, imp):
        n = x.shape[0]
        xs = _sub(x, sub)
        scale, m = S.asymmetric(
            xs, _weights(xs, None if imp is None else _sub(imp, sub), kind), nmax, rmin, rdelta, nstep
        )
        scale, mins = scale.reshape(n, -1), (-m).reshape(n, -1)
        ms, mm = scale.amax(1, keepdim=True), mins.amax(1, keepdim=True)
        ls = _div(scale * smax, ms).round().clamp(0, smax)
        lm = _div(mins * smax, mm).round().clamp(0, smax)
        d, dmin = _f16(ms / smax), _f16(mm / smax)
        dl = (d.float() * ls).repeat_interleave(sub, 1)
        ml = (dmin.float() * lm).repeat_interleave(sub, 1)
        q = _div(x + ml, dl).round().clamp(0, nmax)
        return {"d": d, "dmin": dmin, "ls": ls.to(torch.int16), "lm": lm.to(torch.int16), "q": q.to(torch.int16)}

    return encode


def _kdecode(sub: int):
    def decode(c):
        dl = (c["d"].float() * c["ls"].float()).repeat_interleave(sub, 1)
        ml = (c["dmin"].float() * c["lm"].float()).repeat_interleave(sub, 1)
        return dl * c["q"].float() - ml

    return decode


def _ksym(nmax: int, lo: int, hi: int, sub: int, smax: int, kind: str = "square"):
    """Q3_K / Q6_K: sub-blocks with a signed scale, quantized to integers in ``[-smax, smax-1]``."""

    def encode(x, imp):
        n = x.shape[0]
        xs = _sub(x, sub)
        scale = S.symmetric(xs, _weights(xs, None if imp is None else _sub(imp, sub), kind), nmax, lo, hi).reshape(
            n, -1
        )
        mx = S.signed_absmax(scale)
        iscale = _div(torch.full_like(mx, -float(smax)), mx)
        ls = (iscale * scale).round().clamp(-smax, smax - 1)
        d = _f16(_div(torch.ones_like(iscale), iscale))
        dl = (d.float() * ls).repeat_interleave(sub, 1)
        q = _div(x, dl).round().clamp(lo, hi)
        return {"d": d, "ls": ls.to(torch.int16), "q": q.to(torch.int16)}

    return encode


def _ksym_decode(sub: int):
    def decode(c):
        return (c["d"].float() * c["ls"].float()).repeat_interleave(sub, 1) * c["q"].float()

    return decode


def _pack_q2_k(c):
    scales = (c["ls"] | (c["lm"] << 4)).to(torch.uint8).numpy()
    return np.concatenate([scales, _crumbs(c["q"]), _bytes16(c["d"]), _bytes16(c["dmin"])], 1)


def _pack_q3_k(c):
    u = c["q"] + 4
    return np.concatenate([_bitplanes(u, 2, 32), _crumbs(u & 3), _scales_q3(c["ls"] + 32), _bytes16(c["d"])], 1)


def _pack_q4_k(c):
    return np.concatenate([_bytes16(c["d"]), _bytes16(c["dmin"]), _scales_k4(c["ls"], c["lm"]), _nibbles_k(c["q"])], 1)


def _nibbles_k(q: torch.Tensor) -> np.ndarray:
    """k-quants' 4-bit layout: byte ``c*32+l`` holds element ``c*64+l`` (low) and ``c*64+32+l`` (high)."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1).numpy()


def _pack_q5_k(c):
    q = c["q"]
    return np.concatenate(
        [
            _bytes16(c["d"]),
            _bytes16(c["dmin"]),
            _scales_k4(c["ls"], c["lm"]),
            _bitplanes(q, 4, 32),
            _nibbles_k(q & 0xF),
        ],
        1,
    )


def _pack_q6_k(c):
    u = (c["q"] + 32).to(torch.uint8)
    n = u.shape[0]
    h = u.reshape(n, 2, 4, 32)  # half, quarter, l
    lo = h & 0xF
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2).reshape(n, 128)
    hi = h >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql.numpy(), qh.numpy(), c["ls"].to(torch.int8).numpy().view(np.uint8), _bytes16(c["d"])], 1)


# -------------------------------------------------------------------- IQ4
def _iq4_nl(x, imp):
    d = _f16(S.codebook(x, _weights(x, imp, "square"), IQ4_VALUES))
    return {"d": d, "q": _iq4_index(x, d.float())}


def _iq4_index(x: torch.Tensor, dl: torch.Tensor) -> torch.Tensor:
    idx = S.nearest(IQ4_VALUES, _div(x, dl))
    return torch.where(dl != 0, idx, torch.full_like(idx, 8)).to(torch.int16)


def _iq4_nl_decode(c):
    return c["d"].float() * IQ4_VALUES.to(c["q"].device)[c["q"].long()]


def _iq4_xs(x, imp):
    n = x.shape[0]
    xs = _sub(x, 32)
    scale = S.codebook(xs, _weights(xs, None if imp is None else _sub(imp, 32), "square"), IQ4_VALUES).reshape(n, 8)
    mx = S.signed_absmax(scale)
    d = -mx / 32
    ls = (_div(scale, d)).round().clamp(-32, 31)
    d16 = _f16(d)
    dl = (d16.float() * ls).repeat_interleave(32, 1)
    return {"d": d16, "ls": ls.to(torch.int16), "q": _iq4_index(x, dl)}


def _iq4_xs_decode(c):
    return (c["d"].float() * c["ls"].float()).repeat_interleave(32, 1) * IQ4_VALUES.to(c["q"].device)[c["q"].long()]


def _pack_iq4_nl(c):
    return np.concatenate([_bytes16(c["d"]), _nibbles(c["q"])], 1)


def _pack_iq4_xs(c):
    s = (c["ls"] + 32).to(torch.int32)
    high = (((s >> 4) & 3) << (2 * torch.arange(8, dtype=torch.int32))).sum(1, dtype=torch.int32).to(torch.int16)
    low = ((s[:, 0::2] & 0xF) | ((s[:, 1::2] & 0xF) << 4)).to(torch.uint8).numpy()
    return np.concatenate([_bytes16(c["d"]), _bytes16(high), low, _nibbles(c["q"])], 1)


# -------------------------------------------------------------- the table
T = GGMLQuantizationType
for _t in (
    BlockType("q8_0", T.Q8_0, 8, True, _sym32(127, -127, 127), _decode_sym, _pack_q8_0, "8-bit, fp16 scale per 32"),
    BlockType(
        "q6_k",
        T.Q6_K,
        6,
        True,
        _ksym(32, -32, 31, 16, 128),
        _ksym_decode(16),
        _pack_q6_k,
        "6-bit, int8 scale per 16, fp16 per 256",
    ),
    BlockType(
        "q5_k",
        T.Q5_K,
        5,
        False,
        _kasym(31, 32, 63, -0.5, 0.1, 15, "rms_abs"),
        _kdecode(32),
        _pack_q5_k,
        "5-bit, 6-bit scale and min per 32, fp16 per 256",
    ),
    BlockType(
        "q5_1",
        T.Q5_1,
        5,
        False,
        _asym32(31, -0.9, 0.05, 36),
        _decode_asym,
        _pack_q5_1,
        "5-bit, fp16 scale and min per 32",
    ),
    BlockType("q5_0", T.Q5_0, 5, True, _sym32(16, -16, 15), _decode_sym, _pack_q5_0, "5-bit, fp16 scale per 32"),
    BlockType(
        "q4_k",
        T.Q4_K,
        4,
        False,
        _kasym(15, 32, 63, -1.0, 0.1, 20, "rms_abs"),
        _kdecode(32),
        _pack_q4_k,
        "4-bit, 6-bit scale and min per 32, fp16 per 256",
    ),
    BlockType(
        "q4_1",
        T.Q4_1,
        4,
        False,
        _asym32(15, -0.9, 0.05, 36),
        _decode_asym,
        _pack_q4_1,
        "4-bit, fp16 scale and min per 32",
    ),
    BlockType("q4_0", T.Q4_0, 4, True, _sym32(8, -8, 7), _decode_sym, _pack_q4_0, "4-bit, fp16 scale per 32"),
    BlockType(
        "iq4_xs",
        T.IQ4_XS,
        4,
        True,
        _iq4_xs,
        _iq4_xs_decode,
        _pack_iq4_xs,
        "4-bit non-linear codebook, 6-bit scale per 32, fp16 per 256",
    ),
    BlockType(
        "iq4_nl",
        T.IQ4_NL,
        4,
        True,
        _iq4_nl,
        _iq4_nl_decode,
        _pack_iq4_nl,
        "4-bit non-linear codebook, fp16 scale per 32",
    ),
    BlockType(
        "iq3_s",
        T.IQ3_S,
        3,
        True,
        ggml_iq3.encode,
        ggml_iq3.decode,
        ggml_iq3.pack,
        "3-bit lattice (512-point grid per 4 weights) with signs, 4-bit scale per 32, fp16 per 256",
    ),
    BlockType(
        "q3_k",
        T.Q3_K,
        3,
        True,
        _ksym(4, -4, 3, 16, 32),
        _ksym_decode(16),
        _pack_q3_k,
        "3-bit, 6-bit scale per 16, fp16 per 256",
    ),
    BlockType(
        "q2_k",
        T.Q2_K,
        2,
        False,
        _kasym(3, 16, 15, -0.5, 0.1, 15, "abs"),
        _kdecode(16),
        _pack_q2_k,
        "2-bit, 4-bit scale and min per 16, fp16 per 256",
    ),
):
    TYPES[_t.name] = _t


# ------------------------------------------------------------- quantizers
def _blocks(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None):
    t = TYPES[fmt.quantizer]
    if w.dim() != 2:
        raise FormatError(f"{t.name} expects a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if in_f % t.block:
        raise FormatError(f"{t.name} needs rows that are a multiple of {t.block}, got {in_f}")
    x = w.detach().to(torch.float32).reshape(-1, t.block)
    imp = None
    if importance is not None:
        if importance.shape != (in_f,):
            raise FormatError(f"importance must have shape ({in_f},), got {tuple(importance.shape)}")
        imp = (
            importance.detach()
            .to(device=x.device, dtype=torch.float32)
            .clamp_min(0)
            .reshape(1, -1)
            .expand(out_f, in_f)
            .reshape(-1, t.block)
        )
    return t, x, imp


def encode(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> Codes:
    """The codes of ``w`` in GGML type ``fmt.quantizer`` (in row chunks, to bound memory)."""
    t, x, imp = _blocks(w, fmt, importance)
    step = max(1, CHUNK // t.block)
    parts = [t.encode(x[i : i + step], None if imp is None else imp[i : i + step]) for i in range(0, len(x), step)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def pack(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> np.ndarray:
    """GGML bytes of ``w``, ``[out, in / block * type_size]`` uint8, as a GGUF tensor stores them
    (encoded on ``w``'s device, packed on the CPU)."""
    t = TYPES[fmt.quantizer]
    return t.pack({k: v.cpu() for k, v in encode(w, fmt, importance).items()}).reshape(w.shape[0], -1)


def _quantize(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
    t = TYPES[fmt.quantizer]
    return t.decode(encode(w, fmt, importance)).reshape(w.shape).to(w.dtype)


def _make(t: BlockType) -> Quantizer:
    return Quantizer(
        t.name,
        _quantize,
        version="v1",
        min_bits=1,
        min_bits_symmetric=1,
        fixed=(("bits", t.bits), ("group_size", t.block), ("symmetric", t.symmetric)),
        storage_bits=lambda fmt, in_features, t=t: t.bits_per_weight,
        uses_importance=True,
        about=f"GGUF {t.qtype.name}: {t.about}; {t.bits_per_weight:g} bits per weight",
    )


for _t in TYPES.values():
    register("quantizer", _t.name)(_make(_t))
