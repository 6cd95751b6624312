"""Eval suites, metrics (builtin, DeepEval, RAGAS, user callables), the harness and gates."""
