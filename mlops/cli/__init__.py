"""The `mlops` command line: thin Typer commands over mlops.pipeline and the registry."""
