"""The models: ``models`` (loading tokenizers, LMs and the judge; the precision rule of ``--dtype auto``),
``batching`` (padding prompt + response rows), ``logprobs`` (the one response log-prob head), ``lm_fitting``
(next-token training), ``offline_models`` (the self-built tokenizer, GPT-2 and judge) and ``train_sft`` (the
optional SFT stage).

May import: ``config``, ``runtime``, ``dataset``, ``dpo_utils``, ``ppo_utils`` (and each other).
"""
