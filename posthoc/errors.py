"""Typed errors. The library raises them; the CLI prints `str(error)` as one line and exits 2."""


class PosthocError(Exception):
    """Base class of every error posthoc raises on bad input. Its message names the culprit and the fix."""


class CheckpointError(PosthocError):
    """A checkpoint cannot be opened or read (missing, corrupt, unsafe, offline hub id)."""


class OutputError(PosthocError):
    """The output location is not acceptable (exists, inside an input) or a written value is invalid."""


class IncompatibleError(PosthocError):
    """Inputs cannot be combined (missing tensors, shape or vocabulary mismatch)."""


class ConfigError(PosthocError):
    """A merge config, recipe or parameter is invalid (unknown method or key, value out of range)."""


class AssetError(PosthocError):
    """A packaged real model or data set is not installed; the message names the pip command that installs it."""


class DataError(PosthocError):
    """A data set is empty, malformed, or cannot be split or subset as asked."""


class RecipeError(ConfigError):
    """A recipe is invalid, or one of its steps failed (the message names the step)."""
