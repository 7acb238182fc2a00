"""What the training loops share: ``lifecycle`` (TrainingRun: resume, checkpoints, metrics.jsonl, the evaluation
cadence, Ctrl-C; and RunContext), ``reward_model`` (PPO's reward: the Bradley-Terry model or the judge's logit) and
``pair_generation`` (``--pair_source generated``: the reference's samples labelled by the judge).

May import: everything below ``train_dpo`` / ``train_ppo``: ``config``, ``runtime``, ``dataset``, ``dpo_utils``,
``ppo_utils``, ``modeling``, ``eval_utils`` (and each other).
"""
