"""The task soup, callable in one line (the README demo ends with it)."""

from __future__ import annotations

import os
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


