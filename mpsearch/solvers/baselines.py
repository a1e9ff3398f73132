"""Baseline plans expressed in our plan format: uniform, and a llama.cpp-style recipe.

The recipe follows llama.cpp's Q4_K_M mixture: ``attn_v`` and ``ffn_down`` get more
bits in the first and last eighth of the layers and in every third layer between
(``use_more_bits`` in llama.cpp), every other tensor gets fewer. To compare at equal
effective bits, :func:`recipe_formats` picks the (low, high) pair of the space's
formats with the largest effective bits that fits the budget.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ..core.format import Format
from ..core.space import Decision, Member, plan_bits

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MORE_BITS_TENSORS = re.compile(r".*(?:self_attn\.v_proj|mlp\.down_proj)$")


def allowed(d: Decision, m: Member, want: Format) -> Format:
    """``want`` if the decision may take it; otherwise the option the rules leave (pins, bit
    bounds) with the nearest effective bits, more bits on a tie. Baselines honour the same
    rules as the search, so pinned tensors cost the same in every plan of a comparison."""
    if want in d.formats:
        return want
    target = want.effective_bits(m.in_features)
    return min(
        d.formats, key=lambda f: (abs(f.effective_bits(m.in_features) - target), -f.effective_bits(m.in_features))
    )


def uniform_formats(decisions: list[Decision], fmt: Format) -> dict[str, Format]:
    """Every decision tensor in ``fmt``, where the rules allow it (an error names a tensor it does not fit)."""
    out = {}
    for d in decisions:
        for m in d.members:
            if not fmt.fits(m.in_features):
                raise ValueError(
                    f"uniform {fmt.key}: group size does not divide {m.name}'s input dimension {m.in_features}"
                )
            out[m.name] = allowed(d, m, fmt)
    return out


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule: first/last eighth of the layers, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def recipe_split(members: list[Member]) -> set[str]:
    """Names of the tensors the recipe gives more bits."""
    layers = {m.name: int(mt[1]) for m in members if (mt := _LAYER.search(m.name))}
    if not layers:
        return set()
    n = max(layers.values()) + 1
    return {name for name, i in layers.items() if MORE_BITS_TENSORS.match(name) and use_more_bits(i, n)}


def recipe_plan_formats(decisions: list[Decision], low: Format, high: Format) -> dict[str, Format]:
    """``high`` for the recipe's more-bits tensors, ``low`` for the rest, where the rules allow."""
    more = recipe_split([m for d in decisions for m in d.members])
    return {m.name: allowed(d, m, high if m.name in more else low) for d in decisions for m in d.members}


def natural_recipe(decisions: list[Decision], base: Format, bits: int) -> dict[str, Format]:
    """The recipe at its own size: ``bits`` for most tensors, ``bits + 2`` (at most 8) for
    the more-bits tensors, both with the base group size (``bits=4`` is Q4_K_M-like)."""
    low = replace(base, bits=bits)
    return recipe_plan_formats(decisions, low, replace(base, bits=min(bits + 2, 8)))


def recipe_formats(decisions: list[Decision], budget_bits: float, candidates: list[Format]) -> dict[str, Format] | None:
    """The recipe at the largest effective bits <= ``budget_bits`` (``None`` if none fits).

    Low and high formats come from ``candidates`` that fit every decision tensor;
    high has more bits than low. Preference, in order: the most bits for the bulk of
    the tensors (low), the most effective bits overall, llama.cpp's +2 gap
    (Q4_K/Q6_K), then smaller groups.
    """
    members = [m for d in decisions for m in d.members]
    usable = [f for f in candidates if not f.is_full and all(f.fits(m.in_features) for m in members)]
    best, best_key = None, None
    for low in usable:
        for high in usable:
            if high.bits <= low.bits:
                continue
            fmts = recipe_plan_formats(decisions, low, high)
            bits = plan_bits(fmts, members)
            if bits > budget_bits + 1e-9:
                continue
            key = (low.bits, round(bits, 9), high.bits - low.bits == 2, -low.group_len(10**9), -high.group_len(10**9))
            if best_key is None or key > best_key:
                best, best_key = fmts, key
    return best
