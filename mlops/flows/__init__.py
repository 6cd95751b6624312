"""The orchestrator: one session (composition root), the stages, and the flows the CLI calls.

    session.py   Session.open: config, registry, backend, once per command; resolve_release
    stages.py    recover, train, evaluate, production_results, gate, roll_out
    run.py       `mlops run`: the whole loop
    release.py   `mlops eval`, `mlops deploy`, `mlops rollback`: one function each

A CLI command parses its options, calls one function here, and prints what it returns.
"""
