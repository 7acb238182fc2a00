"""The study's work items for the worker processes (``--jobs N``, ``runtime/workers.py``; ``scripts/grid.py`` too).

:func:`plan` lists the items of a study's runs: the self-built models when the caller has not built them, each
seed's judged pairs (``--pair_source generated``), each seed's reward model (learned-reward PPO) and DPO's reference
log-probs, then every run, done exactly as the one-process loop does it (``experiment.obtain_run``: kept when
finished with ``--resume``, linked from ``--reuse_runs_from``, else trained). After training, the study's protocol
hands the held-out evaluations of the chosen checkpoints to the workers the same way (``protocol.heldout_result``,
cached). The worker processes pass each item to ``experiment.make_worker``'s function (:data:`HANDLER`).
"""

from __future__ import annotations

import dataclasses

from runtime import workers

HANDLER = "study.experiment"  # the module whose make_worker(cfg) does an item, imported in each worker process


def plan(cfg, specs: list, build_models: bool = False) -> list[dict]:
    """The work items for ``specs`` (``grid.RunSpec``), each with ``after``: the indices of the items it waits for.
    The self-built models before everything (when asked); each seed's judged pairs (``--pair_source generated``)
    before that seed's reward model and reference log-probs; those before the seed's runs, so that no two
    processes ever write one cache entry. The runs of PPO and PPO-GT (the longest) come before DPO's, so that the
    last items, which one process may finish alone, are short."""
    items = [{"what": "models", "after": []}] if build_models and cfg.model.build_offline_models else []
    first = list(range(len(items)))
    seeds = list(dict.fromkeys(s.seed for s in specs))
    pairs = {}
    if cfg.dpo.pair_source == "generated":
        for seed in seeds:
            pairs[seed] = [len(items)]
            items.append({"what": "pairs", "seed": seed, "after": first})
    shared = {}
    for seed in seeds:
        mine = [s for s in specs if s.seed == seed]
        dpo = next((s for s in mine if s.method == "dpo"), None)
        ppo = next((s for s in mine if s.method != "dpo"  # on the learned reward: the reward model
                    and cfg.replace(**s.overrides).ppo.ppo_reward == "learned"), None)
        for what, spec in (("reference_logps", dpo), ("reward_model", ppo)):
            if spec is not None:
                shared.setdefault(seed, []).append(len(items))
                items.append({"what": what, "spec": dataclasses.asdict(spec), "after": first + pairs.get(seed, [])})
    for spec in sorted(specs, key=lambda s: s.method == "dpo"):  # stable: the study's order otherwise
        items.append({"what": "run", "spec": dataclasses.asdict(spec),
                      "after": first + pairs.get(spec.seed, []) + shared.get(spec.seed, [])})
    return items


def run_in_processes(cfg, specs: list, jobs: int, build_models: bool = False) -> None:
    """Train ``specs`` (``grid.RunSpec``): every item of their :func:`plan` in up to ``jobs`` worker processes."""
    workers.run_items(cfg, plan(cfg, specs, build_models), jobs, HANDLER, f"{len(specs)} runs", "train", "study")
