"""The demo's last step: the bundled task soup on the demo's base encoder."""

from __future__ import annotations

import time

from posthoc.demo.context import DemoContext
from posthoc.recipes.runner import run_recipe


def demo_step(context: DemoContext) -> str:
    """The README demo's last step (a `posthoc.demo.context.DemoStep`): the bundled task soup on the demo's base
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
