"""The vocabulary every part speaks: the registry, formats, search spaces, plans, layer kinds, devices,
progress and stage timings, statistics, tensor-name patterns, and reading what a user hands in.
Nothing here imports a higher floor."""
