"""Merging checkpoints: methods (pure tensor functions in one registry), configs, the streaming engine."""

from posthoc.merge import methods as _methods  # noqa: F401  (registers the methods)
from posthoc.merge.config import MergeConfig
from posthoc.merge.engine import merge as merge_checkpoints
from posthoc.merge.registry import REGISTRY, MergeMethod, get_method
from posthoc.merge.result import MergeResult

__all__ = ["REGISTRY", "MergeConfig", "MergeMethod", "MergeResult", "get_method", "merge_checkpoints"]
