"""Orchestration: a search's configuration and session, the searches (proxy MILP, joint W/A/KV,
refinement, evolution, workers), ground truth and the leaderboard. Only this floor decides
what is cached and writes a run's output files."""
