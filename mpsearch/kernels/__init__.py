"""Real low-bit kernels: a plan's linears stored packed and run by torch operators, to time them.

The fake-quant backend (:mod:`mpsearch.quant.apply`) measures what a plan is worth; these
kernels measure what it costs. Each kernel stores a weight in its own layout and runs
``x @ W.T`` from it. ``mpsearch profile-device`` times every (layer shape, format, kernel) on
this machine (:mod:`mpsearch.run.profile`); :func:`mpsearch.kernels.deploy.deploy` builds a
model whose decision linears run through them, and its decode time is what the cost
models are checked against.
"""

from .base import Kernel, get_kernel, kernel_names, kernels_for

__all__ = ["Kernel", "get_kernel", "kernel_names", "kernels_for"]
