"""mpsearch: find mixed-precision quantization plans, and measure them.

    import mpsearch
    result = mpsearch.search(budgets=("uniform:3",), proxies=("fisher",))
    mpsearch.apply_(model, mpsearch.Plan.load("plan.json"))
"""
__version__ = "0.1.0"

from .measure.evaluate import Evaluator, evaluate_plan  # noqa: E402
from .core.plan import Plan, PlanError  # noqa: E402
from .quant import Format, apply, apply_  # noqa: E402
from .run.search import SearchConfig, SearchResult, search  # noqa: E402
from .core.space import SearchSpace  # noqa: E402

__all__ = ["Evaluator", "Format", "Plan", "PlanError", "SearchConfig", "SearchResult", "SearchSpace", "apply", "apply_", "evaluate_plan", "search"]
