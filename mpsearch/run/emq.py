"""EMQ-style evolved proxies: genetic programming over the proxy expression language, with DEAP.

A genome is a DEAP expression tree. Its leaves are primitive terms of the expression
language, each a scalar per (tensor, format) (:data:`TERMS`: ``sum(fisher * dw**2)``,
``qerr``, ``bits``, ``htrace``, ...); its inner nodes are unary and binary operations
(:data:`UNARY`, :data:`BINARY`). Every term is computed once per (tensor, format) as an
ordinary proxy table, so scoring a genome is array arithmetic, not a pass over weights.

Fitness is the Spearman correlation of the genome's plan predictions with measured KL
on the ground truth's training plans (``plan % 3 != 0``; the leaderboard scores the
held-out third). A validity screen rejects, before scoring, a genome that gives NaN or
inf anywhere, is constant, or is degenerate (does not tell the formats of most tensors
apart, or gives nearly every plan the same value). Selection keeps diversity: duplicate
expressions are replaced by fresh random genomes every generation, plus a share of
random immigrants. The run is saved after every generation (DEAP's pickling recipe) and
resumes from there. The winner is written as an ordinary proxy file.
"""

from __future__ import annotations

import logging
import operator
import pickle
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.files import write_atomic
from ..core.stats import spearman
from .leaderboard import held_out, plan_predictions

log = logging.getLogger(__name__)

#: the leaves: terms of the expression language, one scalar per (tensor, format)
TERMS: dict[str, str] = {
    "qerr": "qerr",
    "bits": "bits",
    "numel": "numel",
    "fisher_dw": "sum(fisher * dw**2)",
    "hdiag_dw": "sum(hdiag * dw**2)",
    "xtx_dw": "sum(xtx * dw**2)",
    "hinv_dw": "sum(dw**2 / hinv)",
    "fisher_sum": "sum(fisher)",
    "htrace": "htrace",
    "grad_w": "sum(abs(grad * w))",
    "synflow": "sum(synflow)",
    "w_sq": "sum(w**2)",
    "xtx_w": "sum(xtx * w**2)",
    "xtx_mean": "mean(xtx)",
    "act_entropy": "act_entropy",
}
EPS = 1e-12


def _pdiv(a, b):
    return a / (np.abs(b) + EPS)


def _psqrt(a):
    return np.sqrt(np.abs(a))


def _plog(a):
    return np.log(np.abs(a) + EPS)


#: name -> (numpy function, expression-language template)
UNARY = {
    "sqrt": (_psqrt, "sqrt(abs({0}))"),
    "log": (_plog, "log(abs({0}) + 1e-12)"),
    "square": (np.square, "square({0})"),
    "abs": (np.abs, "abs({0})"),
    "neg": (operator.neg, "(-{0})"),
}
BINARY = {
    "add": (operator.add, "({0} + {1})"),
    "sub": (operator.sub, "({0} - {1})"),
    "mul": (operator.mul, "({0} * {1})"),
    "div": (_pdiv, "({0} / (abs({1}) + 1e-12))"),
}


@dataclass(frozen=True)
class GPConfig:
    """The GP's settings; a checkpoint resumes only under the same ones."""

    population: int = 64
    generations: int = 30
    tournament: int = 3
    crossover: float = 0.6
    mutation: float = 0.3
    max_height: int = 6
    immigrants: float = 0.1
    seed: int = 0


def term_proxies() -> list:
    """The terms as proxies (``term_<name>``), so sessions compute and cache their tables."""
    from ..proxies.proxy import Proxy

    return [Proxy.from_string(f"term_{k}", v) for k, v in TERMS.items()]


def _pset():
    from deap import gp

    pset = gp.PrimitiveSet("PROXY", len(TERMS))
    pset.renameArguments(**{f"ARG{i}": k for i, k in enumerate(TERMS)})
    for name, (f, _) in UNARY.items():
        pset.addPrimitive(f, 1, name=name)
    for name, (f, _) in BINARY.items():
        pset.addPrimitive(f, 2, name=name)
    return pset


def _creator():
    from deap import base, creator, gp

    if not hasattr(creator, "ProxyFitness"):
        creator.create("ProxyFitness", base.Fitness, weights=(1.0,))
        creator.create("ProxyTree", gp.PrimitiveTree, fitness=creator.ProxyFitness)
    return creator


def to_expression(tree) -> str:
    """The genome as expression-language text (terms spelled out), for an ordinary proxy file."""

    def build(i: int) -> tuple[str, int]:
        node = tree[i]
        if node.arity == 0:
            return f"({TERMS[node.value]})", i + 1
        args, j = [], i + 1
        for _ in range(node.arity):
            a, j = build(j)
            args.append(a)
        template = (UNARY.get(node.name) or BINARY[node.name])[1]
        return template.format(*args), j

    return build(0)[0]


class Problem:
    """The data a genome is scored on: the terms per (tensor, format), grouped into decision
    options, and the ground truth's plans as option indices with their measured KL."""

    def __init__(
        self,
        terms: dict[str, np.ndarray],
        option_of_row: np.ndarray,
        n_options: list[int],
        choice: np.ndarray,
        kl: np.ndarray,
        plans: np.ndarray,
        tensor_of_row: np.ndarray,
    ) -> None:
        self.terms, self.option_of_row, self.n_options = terms, option_of_row, n_options
        self.offsets = _offsets(n_options)
        self.choice, self.kl, self.tensor_of_row = choice, kl, tensor_of_row
        self.train = ~held_out(plans)

    @classmethod
    def from_session(cls, session, gt) -> "Problem":
        """Terms from the session's ``term_*`` tables (all in one row order), plans from the ground truth."""
        from ..run.leaderboard import choices

        tables = {k: session.tables[f"term_{k}"] for k in TERMS}
        first = next(iter(tables.values()))
        names = [d.name for d in session.decisions]
        dec = first["decision"].map({n: i for i, n in enumerate(names)}).to_numpy()
        n_options = [len(d.formats) for d in session.decisions]
        option_of_row = _offsets(n_options)[dec] + first["option"].to_numpy()
        tensor_of_row = first["tensor"].astype("category").cat.codes.to_numpy()
        terms = {k: t["predicted"].to_numpy(dtype=np.float64) for k, t in tables.items()}
        return cls(
            terms,
            option_of_row,
            n_options,
            choices(session, gt),
            gt["kl"].to_numpy(),
            gt["plan"].to_numpy(),
            tensor_of_row,
        )

    def values(self, fn) -> np.ndarray:
        with np.errstate(all="ignore"):
            v = fn(*self.terms.values())
        return np.broadcast_to(np.asarray(v, dtype=np.float64), self.option_of_row.shape)

    def predictions(self, values: np.ndarray) -> np.ndarray:
        per_option = np.bincount(self.option_of_row, weights=values, minlength=sum(self.n_options))
        losses = [per_option[o : o + n] for o, n in zip(self.offsets, self.n_options)]
        return plan_predictions(losses, self.choice)

    def screen(self, values: np.ndarray) -> str | None:
        """Why a genome's values are unusable (None when usable)."""
        if not np.isfinite(values).all():
            return "NaN or inf"
        if np.ptp(values) == 0:
            return "constant"
        spread = np.bincount(self.tensor_of_row, weights=(values - _group_mean(values, self.tensor_of_row)) ** 2)
        if np.mean(spread > 0) < 0.5:
            return "does not tell the formats of most tensors apart"
        preds = self.predictions(values)
        if not np.isfinite(preds).all() or len(np.unique(preds)) < 0.5 * len(preds):
            return "gives most plans the same value"
        return None

    def fitness(self, fn, split: np.ndarray | None = None) -> tuple[float, str | None]:
        values = self.values(fn)
        why = self.screen(values)
        if why is not None:
            return -1.0, why
        mask = self.train if split is None else split
        return spearman(self.predictions(values)[mask], self.kl[mask]), None


def _offsets(n_options: list[int]) -> np.ndarray:
    """Where each decision's options start in the flat list of all options."""
    return np.concatenate([[0], np.cumsum(n_options)[:-1]]).astype(np.int64)


def _group_mean(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return (np.bincount(groups, weights=values) / np.bincount(groups))[groups]


def evolve(
    problem: Problem,
    cfg: GPConfig,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Run (or resume) the GP; returns the best genome's expression, its train fitness and a log per generation.
    ``stop_after`` stops after that many generations of this call (as an interruption would)."""
    from deap import base, gp, tools
    from tqdm.auto import tqdm

    creator = _creator()
    pset = _pset()
    tb = base.Toolbox()
    tb.register("expr", gp.genHalfAndHalf, pset=pset, min_=1, max_=3)
    tb.register("individual", tools.initIterate, creator.ProxyTree, tb.expr)
    tb.register("select", tools.selTournament, tournsize=cfg.tournament)
    tb.register("mate", gp.cxOnePoint)
    tb.register("expr_mut", gp.genFull, min_=0, max_=2)
    tb.register("mutate", gp.mutUniform, expr=tb.expr_mut, pset=pset)
    limit = gp.staticLimit(key=operator.attrgetter("height"), max_value=cfg.max_height)
    tb.decorate("mate", limit)
    tb.decorate("mutate", limit)
    cache: dict[str, tuple[float, str | None]] = {}
    rejected: dict[str, int] = {}

    def score(ind) -> None:
        key = str(ind)
        if key not in cache:
            cache[key] = problem.fitness(gp.compile(ind, pset))
            if cache[key][1]:
                rejected[cache[key][1]] = rejected.get(cache[key][1], 0) + 1
        ind.fitness.values = (cache[key][0],)

    state = _load(checkpoint, cfg)
    if state is None:
        random.seed(cfg.seed)
        pop = [tb.individual() for _ in range(cfg.population)]
        state = {"generation": 0, "population": pop, "log": [], "config": asdict(cfg)}
    else:
        random.setstate(state["random"])
        log.info("resuming the GP at generation %d", state["generation"])
    pop = state["population"]
    for ind in pop:
        score(ind)
    bar = tqdm(
        total=cfg.generations,
        initial=state["generation"],
        desc="EMQ genetic programming",
        disable=not progress,
        unit="gen",
    )
    stop = cfg.generations if stop_after is None else min(cfg.generations, state["generation"] + stop_after)
    while state["generation"] < stop:
        elite = tools.selBest(pop, 2)
        offspring = [tb.clone(i) for i in tb.select(pop, len(pop) - len(elite))]
        for a, b in zip(offspring[::2], offspring[1::2]):
            if random.random() < cfg.crossover:
                tb.mate(a, b)
        for i, ind in enumerate(offspring):
            if random.random() < cfg.mutation:
                offspring[i] = tb.mutate(ind)[0]
        for i in range(int(cfg.immigrants * len(offspring))):  # random immigrants
            offspring[random.randrange(len(offspring))] = tb.individual()
        pop = [tb.clone(i) for i in elite] + offspring
        seen: set[str] = set()
        for i, ind in enumerate(pop):  # no duplicate expressions: diversity
            while str(ind) in seen:
                ind = tb.individual()
            pop[i] = ind
            seen.add(str(ind))
            score(ind)
        best = tools.selBest(pop, 1)[0]
        state["generation"] += 1
        state["log"].append(
            {
                "generation": state["generation"],
                "best": best.fitness.values[0],
                "median": float(np.median([i.fitness.values[0] for i in pop])),
                "expression": str(best),
                "valid": sum(i.fitness.values[0] > -1 for i in pop),
            }
        )
        state["population"] = pop
        state["random"] = random.getstate()
        _save(checkpoint, state)
        bar.update()
    bar.close()
    best = tools.selBest(pop, 1)[0]
    return {
        "tree": str(best),
        "expression": to_expression(best),
        "train_spearman": best.fitness.values[0],
        "log": state["log"],
        "rejected": rejected,
        "fn": gp.compile(best, pset),
    }


def _load(path, cfg: GPConfig) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    _creator()
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
        log.warning("GP checkpoint %s unreadable (%s); starting over", path, e)
        return None
    if state.get("config") != asdict(cfg):
        raise ValueError(
            f"GP checkpoint {path} was made with other settings {state.get('config')}; remove it or change --checkpoint"
        )
    return state


def _save(path, state: dict) -> None:
    if path is None:
        return
    write_atomic(path, lambda tmp: tmp.write_bytes(pickle.dumps(state)))


def write_proxy(result: dict, path: str | Path, name: str = "emq_evolved", note: str = "") -> Path:
    """The winner as an ordinary proxy file (checked to parse before it is written)."""
    from ..proxies.proxy import Proxy

    Proxy.from_string(name, result["expression"])
    body = (
        f'name = "{name}"\nexpression = "{result["expression"]}"\n'
        'description = """\\\nEvolved by genetic programming (mpsearch.run.emq, DEAP) over the expression language: '
        "\\\n"
        f'tree {result["tree"]}; train Spearman {result["train_spearman"]:.3f}. {note}"""\n'
    )
    path = Path(path)
    path.write_text(body)
    return path
