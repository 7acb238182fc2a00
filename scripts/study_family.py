"""The study's equal-KL comparisons, recomputed from what results.json stores, and Holm's correction over the
family of both settings.

    uv run scripts/study_family.py docs/envelope_review_pairs/results.json docs/envelope_generated_pairs/results.json
    uv run scripts/study_family.py ... --write      # also store the family's Holm-adjusted p-values in each file
    uv run scripts/study_family.py ... --tables     # also print each setting's equal-KL tables with the Holm marks

For each results.json it re-derives every band choice from the validation points (``grid.select_band_checkpoints``)
and recomputes every band cell and paired comparison from the chosen checkpoints' per-prompt scores
(``protocol.band_tables``: each seed's paired mean, the t interval and p over seeds, the hierarchical bootstrap,
VADER's), and compares them with the stored ones. Then the family, fixed before the runs: the judge's three paired
comparisons (DPO - PPO, DPO - PPO-GT, PPO - PPO-GT) x every band x every setting given; a comparison that could not
be made (a band a method did not reach) stays in the family with p = 1, so that the family's size does not depend
on the outcome. Holm's step-down adjustment over it (``grid.holm``, alpha 0.05); with ``--write`` it is stored in
each file's ``family`` section, without it the stored one (if any) is checked. Prints "all equal" and exits 0 when
everything recomputes to the stored numbers, exits 1 naming the first difference otherwise. ``--tables`` then
prints each file's equal-KL tables (``plots.band_markdown``) with the family's Holm-adjusted p-values: README's
Key Results are these tables.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.artifacts import atomic_write_text  # noqa: E402
from runtime.run_log import read_results, strict_json  # noqa: E402
from study.grid import family_key, holm, select_band_checkpoints, select_envelope_cells  # noqa: E402
from study.protocol import PAIRS, band_tables, envelope_tables  # noqa: E402

ALPHA = 0.05


def _first_difference(a, b, where: str = "") -> str | None:
    """Where two JSON values differ (numbers to 1e-12 relative), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: present in one only"
            d = _first_difference(a[k], b[k], f"{where}/{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items vs {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{where}[{i}]"))),
                    None)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return None if math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) else f"{where}: {a!r} vs {b!r}"
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def recompute(results: dict) -> dict:
    """The ``protocol.bands`` section, and the ``protocol.envelope`` section where the study has one (the primary
    reading since it exists), from the stored validation points and the held-out per-prompt scores."""
    p = results["protocol"]
    b, seeds = p["bands"], results["study"]["seeds"]
    banded = select_band_checkpoints(p["validation_points"], b["targets"], b["width"])
    out = {"bands": band_tables(banded, p["checkpoints"], seeds, b["targets"], b["width"])}
    if "envelope" in p:
        e = p["envelope"]
        choices = select_envelope_cells(p["validation_points"], e["reference_validation"], e["budgets"])
        out["envelope"] = {**envelope_tables(choices, p["checkpoints"], p["reference"], seeds, e["budgets"]),
                           "reference_validation": e["reference_validation"]}
    return json.loads(strict_json(out))


def primary(results: dict) -> tuple[str, dict]:
    """The reading the family's comparisons come from: the envelope where the study has one, else the bands."""
    p = results["protocol"]
    return ("envelope", p["envelope"]) if "envelope" in p else ("bands", p["bands"])


def family_pvalues(results: dict) -> dict:
    setting = results["setup"]["pair_source"]
    name, b = primary(results)
    out = {}
    for a, c in PAIRS:
        for k in b["budgets" if name == "envelope" else "targets"]:
            d = b["differences"].get(f"{a}-{c}", {}).get(str(k))
            p = d["judge"]["p"] if d and d["seeds"] else None
            out[family_key(setting, f"{a}-{c}", k)] = 1.0 if p is None or not math.isfinite(p) else p
    return out


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    write, tables = "--write" in argv, "--tables" in argv
    unknown = [a for a in argv if a.startswith("--") and a not in ("--write", "--tables")]
    if unknown:
        print(f"error: unknown flag {unknown[0]}: the flags are --write and --tables")
        return 2
    paths = [Path(a) for a in argv if a not in ("--write", "--tables")]
    if not paths:
        print(__doc__.split("\n\n")[1])
        return 2
    files, pvalues = {}, {}
    for path in paths:
        try:
            results = read_results(path)
        except ValueError as e:
            print(f"error: {e}")
            return 2
        if "bands" not in results.get("protocol", {}):
            print(f"error: {path} holds no equal-KL study (protocol.bands): run main.py with --sweep first")
            return 2
        again = recompute(results)
        for section in again:
            diff = _first_difference(again[section], json.loads(strict_json(results["protocol"][section])))
            if diff:
                print(f"{path}: protocol.{section}{diff} DIFFERS FROM STORED")
                return 1
        print(f"{path}: every {' and '.join(again)} cell and paired comparison recomputed from the validation points "
              f"and per-prompt scores: equal")
        files[path] = results
        mine = family_pvalues(results)
        clash = set(mine) & set(pvalues)
        if clash:
            print(f"error: {path} repeats the setting of another file ({sorted(clash)[0]})")
            return 2
        pvalues.update(mine)
    adjusted = holm(pvalues, ALPHA)
    readings = sorted({primary(r)[0] for r in files.values()})
    if len(readings) > 1:
        print("error: the files hold different primary readings (envelope and bands): give studies of one protocol")
        return 2
    rule = ("Holm over the judge's paired comparisons x envelope budgets x settings" if readings == ["envelope"]
            else "Holm over the judge's paired comparisons x bands x settings; not made: p = 1")
    family = {"alpha": ALPHA, "m": len(pvalues), "settings": sorted({k.split("|")[0] for k in pvalues}),
              "rule": rule, "holm": adjusted}
    family = json.loads(strict_json(family))
    print(f"family of {len(pvalues)} comparisons (Holm, alpha {ALPHA}):")
    for key, h in sorted(adjusted.items(), key=lambda kv: kv[1]["p"]):
        print(f"  {key}: p {h['p']:.4f}, Holm {h['p_holm']:.4f}{'  survives' if h['survives'] else ''}")
    for path, results in files.items():
        if write:
            results["family"] = family
            atomic_write_text(path, strict_json(results, indent=2))
            print(f"{path}: family written")
        elif "family" in results:
            diff = _first_difference(family, results["family"])
            if diff:
                print(f"{path}: family{diff} DIFFERS FROM STORED")
                return 1
    print("all equal" + ("" if write or all("family" in r for r in files.values()) else
                         " (no family stored yet: --write stores it)"))
    if tables:
        from study.plots import band_markdown, envelope_markdown

        for path, results in files.items():
            print(f"\n{path} ({results['setup']['pair_source']} pairs):")
            show = envelope_markdown if primary(results)[0] == "envelope" else band_markdown
            print(show({**results, "family": family}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
