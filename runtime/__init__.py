"""The run's plumbing, knowing nothing of models or the study: ``run_log`` (metrics.jsonl, results.json, signals,
StopTraining), ``artifacts`` (hash-keyed cached artifacts, atomic writes, the build lock), ``run_utils`` (seeding,
data order, processes and reductions), ``hub`` (is the model hub usable?), ``exits`` (how a run ends: one line and
its exit code), ``workers`` (items done in one-thread worker processes) and ``cli`` (the command-line parser).

May import: ``config`` only (and each other).
"""
