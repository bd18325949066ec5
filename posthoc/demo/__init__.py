"""The README demo: real fine-tunes of one packaged encoder, merged, split into modules and scored.

It sits above the library and the recipes: nothing in `posthoc` imports it."""
