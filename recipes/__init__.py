"""The bundled recipes (YAML). Installed as the package `posthoc.recipe_files` so `posthoc recipe list` finds them."""
