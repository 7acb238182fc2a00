"""The command line: ``parse_config(argv)`` turns ``--preset NAME --FIELD VALUE ...`` into a validated
:class:`config.Config` (the preset's values, then the flags given), with ``--help`` arranged by stage.

A bad flag is a :class:`config.ConfigError` (one line, exit code 2 in ``main.py``), never a usage dump.
Imports ``config`` only.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import asdict, fields

from transformers import HfArgumentParser

from config import (
    PRESET_NAMES,
    PRESETS,
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    DPOConfig,
    OfflineConfig,
    PPOConfig,
    SFTConfig,
)


class _Parser(HfArgumentParser):
    """A bad flag becomes a ConfigError (one line, exit code 2 in main.py), not a usage dump."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


# --help by stage. The groups only arrange the help: every field stays in its configuration section (the saved
# training_config.json and --resume compare sections).
HELP_GROUPS = {
    "run": ("preset", "dpo_only", "ppo_only", "plots_only", "resume", "seed", "output_dir", "plots_dir", "cache_dir",
            "device", "dtype", "threads", "jobs", "report_to", "log_every", "save_every", "keep_checkpoints",
            "max_nonfinite_skips", "debug_nan_steps"),
    "data": tuple(f.name for f in fields(DataConfig)),
    "models (hub, self-built, optional SFT)": ("policy_model", "judge_model", "build_offline_models",
                                               *(f.name for f in fields(OfflineConfig)),
                                               *(f.name for f in fields(SFTConfig))),
    "DPO": tuple(f.name for f in fields(DPOConfig)),
    "PPO and its reward model": tuple(f.name for f in fields(PPOConfig)),
    "evaluation": ("n_eval_prompts", "sealed_prompts", "n_val_prompts", "eval_batch_size", "eval_temperature",
                   "temperatures", "n_examples"),
    "study (--sweep)": ("sweep", "seeds", "reuse_runs_from", "sweep_betas", "sweep_kl_coefs", "sweep_ppo_gt",
                        "kl_bands", "band_width", "max_kl", "matched_kls", "min_budget_use"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults are the preset's: say so."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        if action.default == "":  # a path resolved from the preset and the flags (the text says how)
            return text.replace(" (default: %(default)s)", "")
        return text.replace("(default: %(default)s)", "(preset: none)" if action.default == [] else
                            "(preset: %(default)s)")


def make_parser() -> _Parser:
    # allow_abbrev=False: an abbreviated flag (--dpo-step for --dpo-steps) is an error, never a silent guess.
    parser = _Parser(list(SECTIONS.values()), allow_abbrev=False, formatter_class=_HelpFormatter,
                     usage="uv run main.py [--preset paper|offline|quick|smoke] [--dpo-only | --ppo-only] "
                           "[--sweep --seeds S ...] [--FLAG VALUE ...]",
                     description="DPO vs PPO on IMDb: train, evaluate, plot. Every default shown is the preset's "
                                 "(--preset offline --help shows the offline preset's). A field that may be empty "
                                 "takes none (--target_kl none: a fixed KL coefficient).")
    for action in parser._actions:  # the parser gives a boolean's --no_ flag the same text as the flag itself
        if isinstance(action, argparse._StoreFalseAction):
            action.help = f"Turn --{action.dest} off (the preset's --{action.dest}: %(default)s)."
        elif action.nargs == "?" and action.const is True:  # a boolean: --flag alone, or --flag true|false
            action.metavar = "true|false"
    where = {name: group for group, names in HELP_GROUPS.items() for name in names}
    groups = {g: parser.add_argument_group(g) for g in HELP_GROUPS}
    for container in list(parser._action_groups):
        if container in groups.values():
            continue
        for action in list(container._group_actions):
            if action.dest in where:  # --no_sweep_ppo_gt (dest sweep_ppo_gt) goes with --sweep_ppo_gt
                container._group_actions.remove(action)
                groups[where[action.dest]]._group_actions.append(action)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse ``argv`` into a validated :class:`Config`: the preset's values, then the flags given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="paper")
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {known.preset!r}: choose one of {', '.join(PRESET_NAMES)}")
    preset = PRESETS[known.preset]
    parser = make_parser()
    # The preset's values become argparse defaults, so only the flags actually given override them.
    defaults = {k: v for name in SECTIONS for k, v in asdict(getattr(preset, name)).items()}
    # The paths resolve from the flags actually given (RunConfig.__post_init__), not from the preset's own.
    defaults.update(output_dir="", plots_dir="", cache_dir="")
    _fit_schedules(defaults, argv)
    parser.set_defaults(**defaults)
    argv, nones = _take_nones(argv)
    try:
        *parts, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if rest:
        raise ConfigError(f"unrecognized argument(s): {' '.join(rest)} (see --help)")
    sections = {name: asdict(part) for name, part in zip(SECTIONS, parts)}
    for name in nones:  # re-validated with the None in place
        sections[next(sec for sec, cls in SECTIONS.items() if name in _optional_fields(cls))][name] = None
    given = [f for f in ("policy_model", "judge_model") if _values(argv, f)]
    if given and sections["model"]["build_offline_models"]:  # else silently replaced by the self-built model
        raise ConfigError(f"--{given[0]} is not used by --preset {known.preset}, which builds its own models; to "
                          f"use yours, add --no_build_offline_models, or use --preset paper")
    return Config.from_dict(sections)


def _values(argv: list[str], name: str) -> list[str]:
    """What each ``--name VALUE`` / ``--name=VALUE`` (or the dashed alias) in ``argv`` gave (a bad one is the
    parser's to report)."""
    flags, out = (f"--{name}", f"--{name.replace('_', '-')}"), []
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in flags:
            out.append(value if eq else (argv[i + 1] if i + 1 < len(argv) else ""))
    return out


def _fit_schedules(defaults: dict, argv: list[str]) -> None:
    """The preset's evaluation schedules fit the preset's run lengths: a shorter run asked for on the command line
    keeps the schedule's steps within it (it still evaluates at its last step). A schedule given is checked as
    given (``DPOConfig.__post_init__``)."""
    for total, schedule in (("dpo_steps", "dpo_eval_steps"), ("ppo_steps", "ppo_eval_steps")):
        steps = _values(argv, total)
        if steps and steps[-1].isdigit() and not _values(argv, schedule):
            defaults[schedule] = [k for k in defaults[schedule] if k <= int(steps[-1])]


def _optional_fields(cls) -> set[str]:
    """The fields of ``cls`` that may be None (``float | None``): ``--FIELD none`` sets them to None."""
    hints = typing.get_type_hints(cls)
    return {f.name for f in fields(cls) if type(None) in typing.get_args(hints[f.name])}


def _take_nones(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without the ``--FIELD none`` (any case; or ``--FIELD=none``) of fields that may be None, and those
    fields' names. argparse would read ``none`` as a number and refuse it."""
    optional = set().union(*(_optional_fields(cls) for cls in SECTIONS.values()))
    out, nones, i = [], [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None  # --target-kl is an alias
        if name in optional and not eq and i + 1 < len(argv) and argv[i + 1].lower() == "none":
            nones.append(name)
            i += 2
            continue
        if name in optional and eq and value.lower() == "none":
            nones.append(name)
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out, nones
