"""Recipes: scripted, cached runs of posthoc's steps (fine-tune, extract, merge, stack, evaluate) on real data.

`run_recipe("task_soup")` runs a bundled recipe; `posthoc recipe run recipes/task_soup.yaml` does the same
from the shell. See `posthoc.recipes.spec` for the format and `posthoc.recipes.steps` for the step kinds.
"""

from posthoc.errors import RecipeError
from posthoc.recipes.catalog import find_recipe, list_recipes
from posthoc.recipes.runner import RecipeResult, StepOutcome, load_recipe, run_recipe
from posthoc.recipes.soup import run_task_soup

__all__ = ["RecipeError", "RecipeResult", "StepOutcome", "find_recipe", "list_recipes", "load_recipe", "run_recipe", "run_task_soup"]
