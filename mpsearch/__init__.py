"""mpsearch: find mixed-precision quantization plans, and measure them.

    import mpsearch
    result = mpsearch.search(budgets=("uniform:3",), proxies=("fisher",))
    result = mpsearch.search(model=my_module, data=mpsearch.BatchData(calib, held_out), space="cnn")
    mpsearch.apply_(model, mpsearch.Plan.load("plan.json"))

The names below are loaded on first use, so ``import mpsearch`` (and every module under it)
imports nothing of the search until it is asked for.
"""

from ._version import __version__

#: public name -> the module that defines it
_PUBLIC = {
    "BatchData": "mpsearch.models.protocol",
    "LabelledBatches": "mpsearch.models.batches",
    "ModelData": "mpsearch.models.protocol",
    "TokenBatches": "mpsearch.models.batches",
    "Evaluator": "mpsearch.measure.evaluate",
    "evaluate_plan": "mpsearch.run.evaluation",
    "Format": "mpsearch.core.format",
    "Plan": "mpsearch.core.plan",
    "PlanError": "mpsearch.core.plan",
    "SearchSpace": "mpsearch.core.space",
    "apply": "mpsearch.quant.apply",
    "apply_": "mpsearch.quant.apply",
    "applied": "mpsearch.quant.apply",
    "SearchConfig": "mpsearch.run.config",
    "SearchResult": "mpsearch.run.outputs",
    "search": "mpsearch.run.search",
}
__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")
