"""The leaderboard's statistics, the ground-truth sampler, and the EMQ genetic programming."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from scipy.stats import kendalltau, spearmanr

from mpsearch.core.stats import mean_ci, paired_diff_ci
from mpsearch.run.leaderboard import BASELINES, held_out, rank, rho_at_k, scores


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 40), seed=st.integers(0, 10_000), k=st.sampled_from([20, 50, 100]))
def test_rho_at_k_is_spearman_on_the_best_k_percent(n, seed, k):
    rng = np.random.default_rng(seed)
    y, p = rng.random(n), rng.random(n)
    m = max(3, int(round(n * k / 100)))
    best = sorted(range(n), key=lambda i: y[i])[:m]  # brute force: the m lowest measured values
    assert rho_at_k(p, y, k) == pytest.approx(spearmanr(p[best], y[best]).statistic)


def test_scores_match_scipy_and_cis_bracket():
    rng = np.random.default_rng(0)
    y = rng.random(60)
    p = y + 0.3 * rng.random(60)
    s = scores(p, y, boot=300)
    assert s["spearman"] == pytest.approx(spearmanr(p, y).statistic)
    assert s["kendall"] == pytest.approx(kendalltau(p, y).statistic)
    for k in ("spearman", "kendall", "rho_top20", "rho_top50", "rho_top100"):
        assert s[f"{k}_lo"] <= s[k] <= s[f"{k}_hi"]
    perfect = scores(y, y, boot=100)
    assert [perfect["spearman"], perfect["spearman_lo"], perfect["spearman_hi"]] == pytest.approx([1.0, 1.0, 1.0])
    noise = scores(rng.random(60), y, boot=300)
    assert noise["spearman_lo"] < 0.3 and noise["spearman_hi"] > -0.3


def test_rank_scores_the_held_out_plans_with_baselines():
    gt = pd.DataFrame({"plan": range(30), "effective_bits": np.linspace(3, 5, 30), "kl": np.linspace(1, 0.1, 30)})
    board = rank(gt, {"good": gt["kl"].to_numpy() * 2, "bad": -gt["kl"].to_numpy()}, evolved={"good"}, boot=50)
    assert set(board.proxy) == {"good", "bad", *BASELINES}
    assert (board.plans == held_out(gt.plan).sum()).all() and held_out(gt.plan).sum() == 10
    row = board.set_index("proxy")
    assert row.loc["good", "spearman"] == pytest.approx(1) and row.loc["good", "evolved"]
    assert row.loc["bad", "spearman"] == pytest.approx(-1)
    assert row.loc[BASELINES[0], "spearman"] == pytest.approx(1)  # here more bits always measure better
    assert board.iloc[0].proxy in ("good", BASELINES[0])
    assert row.loc["good", "vs_best_hand"] == "bad" and row.loc["good", "vs_best_hand_diff"] == pytest.approx(2)
    assert row.loc["good", "vs_best_hand_lo"] > 0


def test_paired_spearman_diff_of_a_proxy_with_itself_is_zero():
    from mpsearch.run.leaderboard import paired_spearman_diff

    rng = np.random.default_rng(2)
    y, p = rng.random(50), rng.random(50)
    assert paired_spearman_diff(p, p, y, boot=100) == (0.0, 0.0, 0.0)


def test_window_bootstrap():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    lo, hi = mean_ci(a)
    assert 1 <= lo <= a.mean() <= hi <= 4
    d, lo, hi = paired_diff_ci(a + 0.5, a)  # a constant difference: no window noise
    assert d == lo == hi == 0.5
    with pytest.raises(ValueError, match="differ in number"):
        paired_diff_ci(a, a[:3])


# --------------------------------------------------------------------------- ground truth
@pytest.fixture
def cnn_session(monkeypatch):
    from mpsearch.models.loader import WITH_DATA
    from mpsearch.run.search import SearchConfig
    from mpsearch.run.session import Session
    from tests.test_convnet import tiny_cnn_model

    monkeypatch.setitem(WITH_DATA, "tiny-cnn", tiny_cnn_model)
    cfg = SearchConfig(
        model="tiny-cnn",
        space="cnn",
        proxies=("fisher", "mse"),
        budgets=("4",),
        calib_chunks=4,
        gram_chunks=4,
        eval_chunks=4,
        refine=0,
        progress=False,
    )
    return Session.open(cfg), cfg


def test_ground_truth_is_stratified_deterministic_and_resumes(cnn_session, tmp_path):
    from mpsearch.run.groundtruth import SamplerConfig, draw, load_ground_truth, make_ground_truth
    from mpsearch.run.leaderboard import choices, plan_predictions, with_config

    session, cfg = cnn_session
    sampler = SamplerConfig(plans=12, lo=3.0, hi=7.0, bins=4, redraw=(0.0, 1.0))
    assert draw(session, sampler, 5).choice == draw(session, sampler, 5).choice
    assert draw(session, sampler, 0).distance == 0  # share 0: the anchor's optimum itself
    out = tmp_path / "gt.csv"
    gt = make_ground_truth(session, out, sampler, {"config": with_config(cfg)}, progress=False)
    assert len(gt) == 12 and sorted(gt.plan) == list(range(12))
    for _, r in gt.iterrows():  # every plan's effective bits lie in its bin
        assert 3.0 + r.bin <= r.effective_bits <= 4.0 + r.bin + 1e-9
    assert {"kl", "ppl", "accuracy", "formats", "kl_windows", "distance"} <= set(gt)
    # resume: drop the last rows, rerun, get the same table
    gt.iloc[:7].to_csv(out, index=False)
    again = make_ground_truth(session, out, sampler, {"config": with_config(cfg)}, progress=False)
    pd.testing.assert_frame_equal(
        again.drop(columns=["kl_windows", "nll_windows"]),
        gt.drop(columns=["kl_windows", "nll_windows"]),
        check_exact=False,
        rtol=1e-9,
    )
    with pytest.raises(ValueError, match="other settings"):
        make_ground_truth(
            session, out, SamplerConfig(plans=12, lo=2.0, hi=7.0, bins=4), {"config": with_config(cfg)}, progress=False
        )
    table, meta = load_ground_truth(out)
    assert (
        meta["config"]["model"] == "tiny-cnn"
        and 0 < meta["reference"]["accuracy"] <= 1
        and meta["reference"]["kl"] == 0
    )
    # the plans' formats give back the predictions a proxy table makes
    ch = choices(session, table)
    pred = plan_predictions(session.losses["mse"], ch)
    from mpsearch.run.search import predicted_loss

    fmts = json.loads(table.formats.iloc[3])
    direct = predicted_loss(
        session.tables["mse"],
        {m.name: next(f for f in d.formats if f.key == fmts[d.name]) for d in session.decisions for m in d.members},
    )
    assert pred[3] == pytest.approx(direct)


# --------------------------------------------------------------------------- EMQ
def _env(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g) + 0.1  # noqa: E731
    w = torch.randn(6, 8, generator=g)
    dw = 0.1 * torch.randn(6, 8, generator=g)
    return {
        "w": w,
        "dw": dw,
        "fisher": r(6, 8),
        "hdiag": r(6, 8),
        "grad": torch.randn(6, 8, generator=g),
        "synflow": r(6, 8),
        "xtx": r(8),
        "hinv": r(8),
        "numel": 48.0,
        "bits": 3.0,
        "qerr": float((dw.double() ** 2).sum()),
        "htrace": torch.tensor(2.5),
        "act_entropy": torch.tensor(1.7),
    }


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000))
def test_evolved_expression_text_computes_what_the_genome_computes(seed):
    """The proxy file the GP writes must give the values the GP scored."""
    import random

    from deap import gp

    from mpsearch.proxies.proxy import Proxy
    from mpsearch.run.emq import TERMS, _pset, to_expression

    pset = _pset()
    random.seed(seed)
    tree = gp.PrimitiveTree(gp.genHalfAndHalf(pset, min_=1, max_=4))
    env = _env(seed)
    terms = [Proxy.from_string("t", text).evaluate(env) for text in TERMS.values()]
    with np.errstate(all="ignore"):
        want = float(gp.compile(tree, pset)(*[np.float64(t) for t in terms]))
    got = Proxy.from_string("evolved", to_expression(tree)).evaluate(env)
    if np.isfinite(want) and abs(want) < 1e20:
        assert got == pytest.approx(want, rel=1e-3, abs=1e-6)


def _synthetic_problem(seed: int = 0):
    """Terms at random; the measured KL is a known expression of them, so the GP can find it."""
    from mpsearch.run.emq import TERMS, Problem

    rng = np.random.default_rng(seed)
    n_dec, n_opt, n_plans = 12, 4, 90
    rows = n_dec * n_opt
    terms = {k: rng.random(rows) + 0.1 for k in TERMS}
    truth = terms["fisher_dw"] * terms["htrace"]
    option_of_row = np.arange(rows)
    choice = rng.integers(0, n_opt, (n_plans, n_dec))
    kl = sum(truth[d * n_opt + choice[:, d]] for d in range(n_dec))
    return Problem(
        terms, option_of_row, [n_opt] * n_dec, choice, kl, np.arange(n_plans), np.repeat(np.arange(n_dec), n_opt)
    )


def test_screen_rejects_nan_constant_and_degenerate():
    p = _synthetic_problem()
    assert p.screen(np.full(48, np.nan)) == "NaN or inf"
    assert p.screen(np.ones(48)) == "constant"
    assert p.screen(np.repeat(np.arange(12.0), 4)) == "does not tell the formats of most tensors apart"
    assert p.screen(p.terms["qerr"]) is None


def test_gp_finds_a_planted_proxy_and_resumes_exactly(tmp_path):
    from mpsearch.proxies.proxy import Proxy
    from mpsearch.run.emq import GPConfig, evolve, write_proxy

    p = _synthetic_problem()
    cfg = GPConfig(population=24, generations=6, seed=3)
    straight = evolve(p, cfg, tmp_path / "a.pkl", progress=False)
    assert straight["train_spearman"] > 0.8
    short = evolve(p, GPConfig(population=24, generations=6, seed=3), tmp_path / "b.pkl", progress=False)
    assert short["tree"] == straight["tree"]  # deterministic
    # resume: a checkpoint cut at generation 3 continues to the same end
    import pickle

    state = pickle.loads((tmp_path / "a.pkl").read_bytes())
    assert state["generation"] == 6 and len(state["log"]) == 6
    with pytest.raises(ValueError, match="other settings"):
        evolve(p, GPConfig(population=10, generations=6, seed=3), tmp_path / "a.pkl", progress=False)
    path = write_proxy(straight, tmp_path / "emq_test.toml", "emq_test")
    assert Proxy.from_file(path).name == "emq_test"


def test_gp_resume_from_a_middle_generation(tmp_path):
    from mpsearch.run.emq import GPConfig, evolve

    p = _synthetic_problem(1)
    full = evolve(p, GPConfig(population=16, generations=4, seed=5), tmp_path / "full.pkl", progress=False)
    evolve(p, GPConfig(population=16, generations=4, seed=5), tmp_path / "cut.pkl", progress=False, stop_after=2)
    resumed = evolve(p, GPConfig(population=16, generations=4, seed=5), tmp_path / "cut.pkl", progress=False)
    assert resumed["tree"] == full["tree"] and resumed["log"] == full["log"]


def test_leaderboard_and_evolve_proxy_cli_on_a_tiny_ground_truth(cnn_session, tmp_path):
    """`mpsearch leaderboard` and `mpsearch evolve-proxy` end to end: CSV/MD/PNG, baselines,
    MILP plans measured, the evolved proxy written as an ordinary file and ranked."""
    from mpsearch.cli import main
    from mpsearch.run.groundtruth import SamplerConfig, make_ground_truth
    from mpsearch.run.leaderboard import with_config

    session, cfg = cnn_session
    gt = tmp_path / "gt.csv"
    make_ground_truth(
        session,
        gt,
        SamplerConfig(plans=30, lo=3.0, hi=7.0, bins=4, redraw=(0.0, 0.5, 1.0)),
        {"config": with_config(cfg)},
        progress=False,
    )
    evolved = tmp_path / "emq_tiny.toml"
    assert (
        main(
            [
                "evolve-proxy",
                str(gt),
                "--out",
                str(evolved),
                "--checkpoint",
                str(tmp_path / "gp.pkl"),
                "--population",
                "12",
                "--generations",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "board"
    assert (
        main(
            [
                "leaderboard",
                str(gt),
                "--proxy",
                "fisher",
                "--proxy",
                "mse",
                "--proxy",
                str(evolved),
                "--budget",
                "4",
                "--boot",
                "50",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    board = pd.read_csv(out.with_suffix(".csv"))
    assert {"proxy", "evolved", "spearman", "spearman_lo", "spearman_hi", "kendall", "rho_top20", "milp_kl@4"} <= set(
        board
    )
    assert set(board.proxy) == {"fisher", "mse", "emq_tiny", *BASELINES}
    assert board.set_index("proxy").loc["emq_tiny", "evolved"]
    assert out.with_suffix(".png").stat().st_size > 1000 and "emq_tiny" in out.with_suffix(".md").read_text()
    # without --proxy: every built-in proxy (a default of the search command once leaked in: fisher only)
    from mpsearch.proxies import list_proxies

    assert main(["leaderboard", str(gt), "--boot", "20", "--out", str(tmp_path / "all"), "--quiet"]) == 0
    assert set(pd.read_csv(tmp_path / "all.csv").proxy) == {*list_proxies(), *BASELINES}


def test_spearman_within_bins_is_the_mean_of_the_bins():
    from mpsearch.run.leaderboard import in_bins

    rng = np.random.default_rng(4)
    y, p = rng.random(40), rng.random(40)
    bins = np.repeat([0, 1, 2, 3], 10)
    bins[-1] = 9  # a bin of one plan is skipped
    want = np.mean([spearmanr(p[bins == b], y[bins == b]).statistic for b in (0, 1, 2, 3)])
    assert in_bins(p, y, bins) == pytest.approx(want)
    s = scores(p, y, boot=50, bins=bins)
    assert s["spearman_in_bins"] == pytest.approx(want) and s["spearman_in_bins_lo"] <= s["spearman_in_bins_hi"]
