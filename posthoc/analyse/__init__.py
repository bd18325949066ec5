"""Analysers: find functional modules inside trained dense transformers (MoE-fication, clustering, masks).

Every analyser keeps one contract (`posthoc.analyse.base.Analyser`, scikit-learn's estimator contract):
`__init__` stores keyword parameters only, declared in one table (`posthoc.analyse.params`) and validated
at fit time; `fit(model, data)` learns and returns self, leaving the caller's model as it was; learned state
lives in attributes with a trailing underscore; the result can be saved and loaded. `registry.ANALYSERS`
lists them by the name of their `posthoc split` command.
"""
