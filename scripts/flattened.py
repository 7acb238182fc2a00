"""Per run of a study: had its validation KL flattened by its last step? (docs/studies.md)

    uv run scripts/flattened.py evaluation_plots/offline/results.json

Prints a markdown table, one row per setting (method and beta / KL coefficient / target), one column per
seed: the run's validation KL at its last evaluation, then "flat" when it changed by less than 10% over the
run's last fifth (``grid.kl_flattened``, recorded in results.json ``runs[...].kl_flattened``) or "moving"
when not, with the change in percent. Then, per method and seed, how many runs passed the study's top KL (its
largest budget or band, 12 nats at the offline preset) at any validation evaluation: the preregistered grid asks
for two per method and seed (docs/preregistration.md). Read from results.json and the runs' metrics.jsonl;
nothing is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.run_log import read_metrics, read_results  # noqa: E402
from study.grid import METHOD_SHORT, kl_flattened, kl_over_last_fifth  # noqa: E402


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if len(sys.argv) != 2:
        print("usage: uv run scripts/flattened.py PATH/results.json (a study's)")
        return 2
    path = Path(sys.argv[1])
    try:
        results = read_results(path)
    except ValueError as e:
        print(e)
        return 2
    runs = results.get("runs", [])
    if not runs:
        print(f"{path}: no 'runs' section: not a study's results.json")
        return 2
    seeds = sorted({r["seed"] for r in runs})
    protocol = results.get("protocol", {})
    # the study's top KL: its largest budget (the envelope's), or band in a study without the envelope; none in a
    # results.json without the protocol, and then no line about it
    top = max(protocol.get("envelope", {}).get("budgets") or protocol.get("bands", {}).get("targets") or [],
              default=None)
    table, n_flat, passed = {}, 0, {}
    for r in runs:
        metrics = Path(r["metrics"])
        if not metrics.is_file():
            print(f"{path}: {metrics} is missing (results.json names the runs' metrics.jsonl): run this where the "
                  f"study ran")
            return 2
        rows = read_metrics(metrics)
        flat, span = kl_flattened(rows), kl_over_last_fifth(rows)
        if flat != r.get("kl_flattened"):
            print(f"{r['name']}: kl_flattened in results.json ({r.get('kl_flattened')}) disagrees with its metrics")
            return 1
        n_flat += bool(flat)
        kls = [row["eval/kl_to_ref"] for row in rows if "eval/kl_to_ref" in row]
        count = passed.setdefault(METHOD_SHORT[r["method"]], {})
        count[r["seed"]] = count.get(r["seed"], 0) + (top is not None and max(kls, default=0.0) >= top)
        if span is None:
            text = "-"
        else:
            start, end = span
            change = (end - start) / abs(end) if end else float("nan")
            text = f"{end:.2f} {'flat' if flat else 'moving'} ({change:+.0%})"
        table.setdefault((r["method"], r["label"]), {})[r["seed"]] = text
    print("| run | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---" * (len(seeds) + 1) + "|")
    for (method, label), by_seed in table.items():
        print(f"| {METHOD_SHORT[method]} {label} | " +
              " | ".join(by_seed.get(s, "") for s in seeds) + " |")
    print(f"\n{n_flat} of {len(runs)} runs flat (validation KL at the last evaluation, nats; its change over the "
          f"run's last fifth)")
    if top is not None:
        print(f"runs past {top:g} nats at any validation evaluation, per seed {'/'.join(map(str, seeds))}: " +
              "; ".join(f"{m} {'/'.join(str(c.get(s, 0)) for s in seeds)}" for m, c in passed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
