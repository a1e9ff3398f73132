"""The quality of a model on data: evaluators (perplexity, KL, accuracy) and task accuracy."""
