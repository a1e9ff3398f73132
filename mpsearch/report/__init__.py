"""Plots and ``report.html``, made from a run folder's files: reports only read."""
