"""Analysers: find functional modules inside trained dense transformers (MoE-fication, clustering, masks).

Every analyser follows the estimator contract: `__init__` stores keyword parameters only, `fit(model, data)`
learns and returns self, learned state lives in attributes with a trailing underscore, and the result can
be saved and loaded.
"""
