"""Report figures are written, and a plan without layer names is a clear error."""

from __future__ import annotations

import pandas as pd
import pytest

from mpsearch.core.format import Format
from mpsearch.report.plots import bit_grid, bit_heatmap, pareto_plot

pytest.importorskip("matplotlib")


def test_pareto_plot_writes_a_png(tmp_path) -> None:
    df = pd.DataFrame({"method": ["a", "a", "b"], "effective_bits": [3.0, 4.0, 3.5], "kl": [1.0, 0.2, 0.5]})
    out = pareto_plot(df, tmp_path / "front.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="kl"):
        pareto_plot(df.drop(columns="kl"), tmp_path / "x.png")


def test_bit_grid_and_heatmap(tmp_path) -> None:
    fmts = {f"model.layers.{l}.self_attn.{k}": Format(b, 64) for l, b in ((0, 3), (1, 4)) for k in ("q_proj", "o_proj")}
    grid = bit_grid(fmts, {n: 128 for n in fmts})
    assert list(grid.columns) == ["q_proj", "o_proj"] and list(grid.index) == [0, 1]
    assert grid.loc[1, "q_proj"] == Format(4, 64).effective_bits(128)
    assert bit_heatmap(fmts, tmp_path / "h.png").exists()
    with pytest.raises(ValueError, match="layers"):
        bit_grid({"lm_head": Format(4, 64)})
