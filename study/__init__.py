"""The study: ``grid`` (the runs of a study, checkpoint selection on validation, frontiers and intervals),
``experiment`` (what every run shares, each seed's data, the loop over seeds and runs), ``jobs`` (the study's items
for the worker processes), ``protocol`` (choose on validation, evaluate the chosen on held-out prompts, compare),
``results`` (the final evaluation and results.json) and ``plots`` (the dashboard and tables, from results.json).

May import: every module and package but ``main.py`` (and each other).
"""
