"""Print vLLM's own `serve` options as mlops/vllm_options.py's table: one line per flag,
`FLAG KIND [CHOICE ...]`, sorted. Runs in vLLM's interpreter ($MLOPS_VLLM_PYTHON), not ours:

    $MLOPS_VLLM_PYTHON tests/vllm_options_dump.py

tests/test_vllm.py compares it with the table; after a vLLM upgrade, paste it into the table.
KIND is how a value is given: bool (--x / --no-x), flag (--x), int, float, str (one value),
list (one or more), optional (zero or one), append (repeatable).
"""

from __future__ import annotations

import argparse


def kind(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "bool" if isinstance(action, argparse.BooleanOptionalAction) else "flag"
    if isinstance(action, argparse._AppendAction):
        return "append"
    if action.nargs in ("+", "*"):
        return "list"
    if action.nargs == "?":
        return "optional"
    parse = action.type
    # vLLM wraps a type in optional_type/parse_type closures: the wrapped callable decides
    while parse is not None and getattr(parse, "__name__", "") in ("_optional_type", "_parse_type"):
        parse = parse.__closure__[0].cell_contents  # type: ignore[union-attr, index]
    return {int: "int", float: "float"}.get(parse, "str")  # type: ignore[call-overload]


def main() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    lines = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        choices = [str(c) for c in action.choices] if action.choices is not None else []
        if action.dest == "quantization":  # argparse takes any string; vLLM's config checks this list
            choices = list(QUANTIZATION_METHODS)
        k = kind(action)
        for flag in action.option_strings:
            if k == "bool" and flag.startswith("--no-") and "--" + flag[5:] in action.option_strings:
                continue  # the negative form of a bool: implied by its line
            lines.append(" ".join([flag, k, *sorted(set(choices))]))
    print("\n".join(sorted(lines)))


if __name__ == "__main__":
    main()
