"""The `mlops` command line: thin Typer commands over mlops.flows (parse, call one flow, print)."""
