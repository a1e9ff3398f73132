"""The proxy leaderboard: every proxy file ranked on a shared ground truth, with bootstrap CIs.

A ground truth (:mod:`mpsearch.run.groundtruth`) is plans with measured KL. A proxy predicts
each plan's loss as the sum of its per-(tensor, format) table; the leaderboard scores
how well those predictions rank the measured KL on the held-out plans (every third plan,
``plan % 3 == 0``; the rest train evolved proxies): Spearman, Kendall's tau, and EMQ's
rho_s@k (Spearman among the k% of plans that measure best), each with a percentile
bootstrap 95% CI over plans. Two baselines sit beside the proxies: model size (rank by
effective bits alone, "no proxy") and random predictions. Each proxy's MILP plans at fixed
budgets are measured too, because a proxy can rank well overall and still pick poor plans.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.stats import kendall, spearman

log = logging.getLogger(__name__)

TOP_K = (20, 50, 100)
BASELINES = ("model size (no proxy)", "random")


def held_out(plans) -> np.ndarray:
    """The held-out split: every third plan (``plan % 3 == 0``)."""
    return (np.asarray(plans) % 3) == 0


def choices(session, gt: pd.DataFrame) -> np.ndarray:
    """``[plans, decisions]`` option indices of the ground truth's plans in this session's decisions."""
    index = {d.name: {f.key: j for j, f in enumerate(d.formats)} for d in session.decisions}
    out = np.zeros((len(gt), len(session.decisions)), dtype=np.int64)
    for r, text in enumerate(gt["formats"]):
        fmts = json.loads(text)
        if set(fmts) != set(index):
            raise ValueError(f"ground-truth plan {gt['plan'].iloc[r]} names other decisions than this search space")
        for c, d in enumerate(session.decisions):
            if fmts[d.name] not in index[d.name]:
                raise ValueError(f"ground-truth plan {gt['plan'].iloc[r]}: {fmts[d.name]} is not an option of {d.name}")
            out[r, c] = index[d.name][fmts[d.name]]
    return out


def plan_predictions(losses: list[np.ndarray], choice: np.ndarray) -> np.ndarray:
    """Sum of a proxy's per-decision losses over each plan's options."""
    return sum(losses[d][choice[:, d]] for d in range(choice.shape[1]))


def rho_at_k(pred: np.ndarray, y: np.ndarray, k: int) -> float:
    """EMQ's rho_s@k: Spearman among the ``k``% of plans with the best (lowest) measured value."""
    n = max(3, int(round(len(y) * k / 100)))
    top = np.argsort(y, kind="stable")[:n]
    return spearman(pred[top], y[top])


def in_bins(pred: np.ndarray, y: np.ndarray, bins: np.ndarray) -> float:
    """Mean Spearman within each effective-bits bin (bins of fewer than 3 plans skipped): how
    well a proxy ranks plans of about the same size, where bits alone say nothing."""
    vals = [spearman(pred[bins == b], y[bins == b]) for b in np.unique(bins) if (bins == b).sum() >= 3]
    return float(np.mean(vals)) if vals else float("nan")


def scores(
    pred: np.ndarray, y: np.ndarray, boot: int = 1000, seed: int = 0, bins: np.ndarray | None = None
) -> dict[str, float]:
    """Spearman, Kendall and rho_s@k of ``pred`` against ``y`` (and, given ``bins``, the mean
    Spearman within bins), each with a bootstrap 95% CI over plans."""
    stats = {
        "spearman": spearman,
        "kendall": kendall,
        **{f"rho_top{k}": (lambda a, b, k=k: rho_at_k(a, b, k)) for k in TOP_K},
    }
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, len(y), len(y)) for _ in range(boot)]
    out: dict[str, float] = {}
    for name, f in stats.items():
        out[name] = f(pred, y)
        vals = np.array([f(pred[s], y[s]) for s in samples])
        out[f"{name}_lo"], out[f"{name}_hi"] = (float(v) for v in np.nanpercentile(vals, [2.5, 97.5]))
    if bins is not None:
        out["spearman_in_bins"] = in_bins(pred, y, bins)
        vals = np.array([in_bins(pred[s], y[s], bins[s]) for s in samples])
        out["spearman_in_bins_lo"], out["spearman_in_bins_hi"] = (float(v) for v in np.nanpercentile(vals, [2.5, 97.5]))
    return out


def rank(
    gt: pd.DataFrame,
    predictions: dict[str, np.ndarray],
    evolved: set[str] = frozenset(),
    target: str = "kl",
    boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per proxy (and baseline), scored on the held-out plans, best Spearman first."""
    mask = held_out(gt["plan"])
    y = gt[target].to_numpy()[mask]
    bins = gt["bin"].to_numpy()[mask] if "bin" in gt else None
    preds = dict(predictions)
    preds[BASELINES[0]] = -gt["effective_bits"].to_numpy()
    preds[BASELINES[1]] = np.random.default_rng(seed).random(len(gt))
    rows = []
    for name, p in preds.items():
        rows.append(
            {
                "proxy": name,
                "evolved": name in evolved,
                "baseline": name in BASELINES,
                "plans": int(mask.sum()),
                **scores(np.asarray(p)[mask], y, boot, seed, bins),
            }
        )
    board = pd.DataFrame(rows)
    hand = board[~board.evolved & ~board.baseline]
    if len(hand) and board.evolved.any():  # does an evolved proxy beat the best hand-designed one beyond the noise?
        best = hand.loc[hand.spearman.idxmax(), "proxy"]
        for i in board.index[board.evolved]:
            d, lo, hi = paired_spearman_diff(
                np.asarray(preds[board.at[i, "proxy"]])[mask], np.asarray(preds[best])[mask], y, boot, seed
            )
            board.loc[i, ["vs_best_hand", "vs_best_hand_diff", "vs_best_hand_lo", "vs_best_hand_hi"]] = [
                best,
                d,
                lo,
                hi,
            ]
    return board.sort_values("spearman", ascending=False, ignore_index=True)


def paired_spearman_diff(
    a: np.ndarray, b: np.ndarray, y: np.ndarray, boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Spearman of ``a`` minus Spearman of ``b`` against ``y``, with a bootstrap 95% CI that
    resamples the same plans for both (their errors are correlated: same plans, same KL)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(boot):
        s = rng.integers(0, len(y), len(y))
        diffs.append(spearman(a[s], y[s]) - spearman(b[s], y[s]))
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return spearman(a, y) - spearman(b, y), float(lo), float(hi)


def milp_quality(session, budgets: list[float], proxies: list[str]) -> pd.DataFrame:
    """Each proxy's MILP plan at each budget (effective bits), measured: one row per (proxy, budget)."""
    from ..solvers import Status, get_solver

    rows = []
    for name in proxies:
        for bits in budgets:
            sol = get_solver("milp").solve(session.problem(name, bits * session.numel))
            if sol.status_ not in Status.SOLUTION_PRESENT:
                raise RuntimeError(f"the MILP for {name} at {bits} bits returned {sol.status_}")
            q = session.measure(session.make_plan(session.formats(sol.choice_)), desc=f"{name}@{bits}")
            rows.append(
                {
                    "proxy": name,
                    "budget_bits": bits,
                    "effective_bits": session.choice_cost(sol.choice_) / session.numel,
                    "kl": q["kl"],
                    "ppl": q["ppl"],
                    **({"accuracy": q["accuracy"]} if "accuracy" in q else {}),
                }
            )
    return pd.DataFrame(rows)


def write(board: pd.DataFrame, milp: pd.DataFrame | None, out: str | Path, title: str) -> dict[str, Path]:
    """``<out>.csv`` (the board, with each proxy's MILP KL per budget as ``milp_kl@B`` columns),
    ``<out>.md`` and ``<out>.png`` (Spearman and rho_s@20 with their CIs)."""
    from ..report.plots import pyplot, save_figure

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = board.copy()
    if milp is not None and len(milp):
        wide = milp.pivot(index="proxy", columns="budget_bits", values="kl")
        wide.columns = [f"milp_kl@{b:g}" for b in wide.columns]
        table = table.merge(wide, left_on="proxy", right_index=True, how="left")
    table.to_csv(out.with_suffix(".csv"), index=False)
    lines = [
        f"# {title}",
        "",
        f"Held-out plans: {int(board['plans'].iloc[0])}. 95% bootstrap CIs over plans in brackets.",
        "",
        "| # | proxy | Spearman | Kendall | rho@20% | rho@50% | rho@100% | Spearman within bits bins |"
        + "".join(f" {c} |" for c in table if c.startswith("milp_kl@")),
        "|---|---|---|---|---|---|---|---|" + "---|" * sum(c.startswith("milp_kl@") for c in table),
    ]
    for i, r in table.iterrows():
        cell = lambda k: f"{r[k]:.3f} [{r[k + '_lo']:.3f}, {r[k + '_hi']:.3f}]"  # noqa: E731
        name = f"**{r.proxy}** (evolved)" if r.evolved else (f"_{r.proxy}_" if r.baseline else r.proxy)
        lines.append(
            f"| {i + 1} | {name} | {cell('spearman')} | {cell('kendall')} | {cell('rho_top20')} | {cell('rho_top50')} "
            "| "
            f"{cell('rho_top100')} | {cell('spearman_in_bins') if 'spearman_in_bins' in r else '-'} |"
            + "".join(f" {r[c]:.4g} |" for c in table if c.startswith("milp_kl@"))
        )
    for _, r in table[table.evolved].iterrows():
        if isinstance(r.get("vs_best_hand"), str):
            lines += [
                "",
                f"{r.proxy} minus the best hand-designed proxy ({r.vs_best_hand}), paired over the same resampled "
                "plans: "
                f"Spearman {r.vs_best_hand_diff:+.3f} [{r.vs_best_hand_lo:+.3f}, {r.vs_best_hand_hi:+.3f}]"
                + (
                    " (better beyond the CI)"
                    if r.vs_best_hand_lo > 0
                    else " (worse beyond the CI)"
                    if r.vs_best_hand_hi < 0
                    else " (within the CI: not better)"
                ),
            ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(board) + 1.5), sharey=True)
    ypos = np.arange(len(board))[::-1]
    for ax, k, label in ((axes[0], "spearman", "Spearman"), (axes[1], "rho_top20", "rho_s@20%")):
        err = np.vstack([board[k] - board[f"{k}_lo"], board[f"{k}_hi"] - board[k]]).clip(0)
        colors = ["tab:red" if e else ("tab:gray" if b else "tab:blue") for e, b in zip(board.evolved, board.baseline)]
        ax.errorbar(board[k], ypos, xerr=err, fmt="none", ecolor="black", capsize=2)
        ax.scatter(board[k], ypos, c=colors, zorder=3)
        ax.axvline(0, color="gray", lw=0.5)
        ax.set_xlabel(f"{label} with measured KL (95% CI)")
    axes[0].set_yticks(ypos, board["proxy"])
    fig.suptitle(title)
    save_figure(fig, out.with_suffix(".png"))
    return {"csv": out.with_suffix(".csv"), "md": out.with_suffix(".md"), "png": out.with_suffix(".png")}


def session_for(
    meta: dict, proxies: list[str], measure: bool = True, progress: bool = True, extra: list = (), device: str = "auto"
):
    """Reopen the session a ground truth was made in (its recorded config), with ``proxies``
    (names or files) and ``extra`` proxy objects (e.g. the GP's terms), on ``device`` (this
    machine's choice, not the recorded one: the ground truth may come from another machine)."""
    from .config import SearchConfig
    from .session import Session

    cfg = SearchConfig(
        **{
            **meta["config"],
            "proxies": tuple(proxies) or ("mse",),
            "measure": measure,
            "refine": 0,
            "progress": progress,
            "budgets": ("4",),
            "device": device,
        }
    )
    s = Session.open(cfg, extra_proxies=list(extra))
    if s.prims.weights != meta["weights"]:
        raise ValueError(
            f"the model's weights differ from the ones the ground truth was measured on ({meta['weights']})"
        )
    return s


def run(
    ground_truth: str | Path,
    proxies: list[str],
    out: str | Path,
    budgets: list[float] = (),
    boot: int = 1000,
    evolved: set[str] = frozenset(),
    progress: bool = True,
    device: str = "auto",
) -> pd.DataFrame:
    """Load a ground truth, compute every proxy's table in its session, rank, measure the MILP plans, write.
    ``proxies`` are names or files; ``evolved`` names the evolved ones; ``device`` is where the model runs."""
    from ..proxies import load_proxy
    from .groundtruth import load_ground_truth

    gt, meta = load_ground_truth(ground_truth)
    session = session_for(meta, proxies, measure=bool(budgets), progress=progress, device=device)
    choice = choices(session, gt)
    names = [load_proxy(p).name for p in proxies]
    preds = {name: plan_predictions(session.losses[name], choice) for name in names}
    board = rank(gt, preds, evolved, boot=boot)
    milp = milp_quality(session, list(budgets), names) if budgets else None
    write(board, milp, out, f"proxy leaderboard: {meta['model']} ({len(gt)} plans, space {meta['space']})")
    return board


def with_config(cfg) -> dict:
    """The SearchConfig fields a ground truth records so the leaderboard can reopen its session."""
    keep = (
        "model",
        "calibration",
        "evaluation",
        "space",
        "calib_seq_len",
        "calib_chunks",
        "gram_chunks",
        "hessian_probes",
        "hessian_sequences",
        "eval_seq_len",
        "eval_chunks",
        "bos",
        "imatrix",
        "threads",
        "seed",
    )
    return {k: getattr(cfg, k) for k in keep}


__all__ = [
    "BASELINES",
    "TOP_K",
    "choices",
    "held_out",
    "milp_quality",
    "plan_predictions",
    "rank",
    "rho_at_k",
    "run",
    "scores",
    "session_for",
    "with_config",
    "write",
]
