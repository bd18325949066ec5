"""The recipes that ship with posthoc, found from a checkout and from an installed package alike.

They live in the repository's `recipes/` folder. An installed wheel carries that folder as the package
`posthoc.recipe_files` (see pyproject.toml); a checkout or an editable install finds it next to the
`posthoc` package. `posthoc recipe run NAME` accepts a bundled recipe's name or any path to a YAML file.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from posthoc.errors import RecipeError


def bundled_dir() -> Path | None:
    """The folder of the bundled recipes, or None when this install has none."""
    spec = importlib.util.find_spec("posthoc.recipe_files")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        if any(folder.glob("*.yaml")):
            return folder
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    return checkout if any(checkout.glob("*.yaml")) else None


@dataclass(frozen=True)
class BundledRecipe:
    name: str
    path: Path
    description: str


def list_recipes() -> list[BundledRecipe]:
    folder = bundled_dir()
    found = []
    for path in sorted(folder.glob("*.yaml")) if folder else []:
        try:
            data = yaml.safe_load(path.read_text()) or {}
            description = " ".join(str(data.get("description", "")).split()) if isinstance(data, dict) else ""
        except yaml.YAMLError as error:
            data, description = {}, f"(not valid YAML: {str(error).splitlines()[0]})"
        found.append(BundledRecipe(str(data.get("name") or path.stem) if isinstance(data, dict) else path.stem, path, description))
    return found


def find_recipe(recipe: str | os.PathLike[str]) -> Path:
    """A path to a YAML file, or the name of a bundled recipe (`task_soup`, `task_soup.yaml`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    for bundled in list_recipes():
        if path.parent == Path(".") and name in (bundled.name, bundled.path.stem):
            return bundled.path
    valid = ", ".join(r.name for r in list_recipes()) or "none installed"
    raise RecipeError(f"{recipe}: no such recipe file, and no bundled recipe of that name; bundled: {valid}")
