"""Run the bundled recipes at their full settings (or with --set overrides) and print their tables.

    python benchmarks/recipes_full.py task_soup cross_modal cross_lingual --work-dir benchmarks/.work/recipes
    python benchmarks/recipes_full.py cross_lingual --profile cpu --threads 1
    python benchmarks/recipes_full.py cross_lingual --set 'languages=[en, de, fr, ru]' --set language_steps=20

Each recipe runs in WORK_DIR/NAME; finished steps are reused on the next run. The tables (and the
per-step wall times) are what recipes/README.md and benchmarks/RESULTS.md report.
"""

from __future__ import annotations

import argparse
import time

from posthoc.cli.main import parse_assignment

from posthoc.recipes import run_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--work-dir", default="benchmarks/.work/recipes")
    parser.add_argument("--set", dest="assignments", action="append", default=[])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", default=None, help="a profile of the recipe (e.g. cross_lingual's cpu)")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args()
    overrides = dict(parse_assignment(a) for a in args.assignments)
    for name in args.recipes:
        started = time.perf_counter()
        result = run_recipe(name, f"{args.work_dir}/{name}", overrides=overrides or None, threads=args.threads,
                            profile=args.profile, progress=args.progress, echo=print)  # fmt: skip
        print(f"\n## {name} ({time.perf_counter() - started:.0f} s this run)")
        for outcome in result.outcomes:
            print(f"  {outcome.name:<28} {outcome.status:<8} {outcome.seconds:8.1f} s")
        for table in result.tables():
            print()
            print(table)


if __name__ == "__main__":
    main()
