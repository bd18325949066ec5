from __future__ import annotations

from typing import Any

import click

from posthoc.recipes import list_recipes, run_recipe

from .main import KeyValue, main, reports_errors


@main.group()
def recipe() -> None:
    """Run scripted recipes: fine-tune, extract, merge, stack and evaluate real models on real data."""


@recipe.command("list")
@reports_errors
def list_command() -> None:
    """The bundled recipes, one line each."""
    found = list_recipes()
    if not found:
        click.echo("no bundled recipes found in this install")
    width = max((len(r.name) for r in found), default=0) + 2
    for r in found:
        click.echo(f"{r.name:<{width}}{r.description}")


@recipe.command("run")
@click.argument("recipe_file")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where outputs go (default: recipes-output/NAME).")
@click.option("--set", "assignments", type=KeyValue(), multiple=True, metavar="KEY=VALUE",
              help="Override a variable (a YAML value; repeatable).")
@click.option("--profile", help="A named set of overrides from the recipe (e.g. reduced: few steps, few examples).")
@click.option("--fresh", is_flag=True, help="Run every step, even those whose outputs are up to date.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: all this process may use).")
@click.option("--progress/--quiet", default=True, help="Progress bars.")
@reports_errors
def run_command(
    recipe_file: str, work_dir: str | None, assignments: tuple[tuple[str, Any], ...], profile: str | None, fresh: bool,
    threads: int | None, progress: bool,
) -> None:
    """Run RECIPE_FILE (a path, or the name of a bundled recipe); print each step and the result tables."""
    overrides = dict(assignments)
    result = run_recipe(recipe_file, work_dir, overrides=overrides, profile=profile, fresh=fresh, threads=threads,
                        progress=progress, echo=click.echo)  # fmt: skip
    for table in result.tables():
        click.echo("")
        click.echo(table)
