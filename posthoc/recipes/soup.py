"""The task soup, callable in one line (the README demo ends with it)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from posthoc.recipes.runner import RecipeResult, run_recipe


def run_task_soup(
    work_dir: str | os.PathLike[str] = "recipes-output/task_soup",
    *,
    reduced: bool = False,
    threads: int | None = None,
    progress: bool = False,
    echo: Callable[[str], Any] | None = print,
) -> RecipeResult:
    """Run the bundled `task_soup` recipe (three fine-tunes of all-MiniLM-L6-v2 merged four ways) and print
    its test table with `echo`. `reduced` runs the test suite's few-step setting (a smoke test, not a result).
    Steps already done in `work_dir` are skipped, so a second call only prints."""
    result = run_recipe("task_soup", work_dir, profile="reduced" if reduced else None, threads=threads,
                        progress=progress, echo=None)  # fmt: skip
    if echo is not None:
        for table in result.tables():
            echo(table)
    return result


def demo_task_soup(context: Any) -> str:
    """The README demo's last step (a `posthoc.demo.DemoStep`): the bundled task soup on the demo's base
    encoder, in the profile its settings name (`demo`: minutes), under the demo's work directory with its
    threads (cached there like the demo's fine-tunes), returning its test table."""
    started = time.perf_counter()
    result = run_recipe("task_soup", context.work_dir / "task_soup", overrides={"base": str(context.base_dir)},
                        profile=context.settings.task_soup_profile, threads=context.threads,
                        fresh=context.fresh, progress=context.progress)  # fmt: skip
    took = time.perf_counter() - started
    header = (f"Task soup (recipes/task_soup.yaml, profile {context.settings.task_soup_profile}): three real tasks "
              f"fine-tuned on the base, merged four ways; {took:.0f} s")  # fmt: skip
    return "\n\n".join([header, *result.tables()])
