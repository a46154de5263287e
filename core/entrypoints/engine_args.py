"""Command-line flags and docs/options.md's tables, made from the options the config classes declare."""
from __future__ import annotations

import argparse
import json
import typing
from types import NoneType, UnionType
from typing import Iterable

from kvserve.core.config import engine_options
from kvserve.core.options import Option


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def template_text(text: str) -> str:
    """A chat template given as Jinja text, or the file that holds it."""
    if text.lstrip().startswith("{"):
        return text
    try:
        with open(text) as f:
            return f.read()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"is neither a Jinja template nor a readable file: {error}") from None


PARSERS = {"json": json_object, "template": template_text}


def command_line_type(hint) -> tuple[type, bool]:
    """The type the command line reads: the field's, or str where it takes several (a size as 4GiB or bytes);
    and whether it takes a list of them."""
    kinds = [t for t in typing.get_args(hint) if t is not NoneType] if isinstance(hint, UnionType) else [hint]
    if len(kinds) == 1 and typing.get_origin(kinds[0]) is list:
        return typing.get_args(kinds[0])[0], True
    return (kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float, str) else str), False


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_option_args(parser, engine_options().values())


def add_option_args(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """A flag for each option, with its default, allowed values and help."""
    for option, hint in typed(options):
        spec, flags = option.field, [option.flag]
        if spec.metadata["short"]:
            flags.append(spec.metadata["short"])
        kind, many = command_line_type(hint)
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=spec.default,
                                help=option.help)
        else:
            reader = PARSERS[spec.metadata["parse"]] if spec.metadata["parse"] else kind
            parser.add_argument(*flags, type=reader, default=spec.default, help=option.help, choices=option.choices,
                                nargs="+" if many else None)


def typed(options: Iterable[Option]) -> list[tuple[Option, object]]:
    """The options, each with its field's resolved type annotation."""
    options, hints = list(options), {}
    for option in options:
        hints.setdefault(option.owner, typing.get_type_hints(option.owner))
    return [(option, hints[option.owner][option.field.name]) for option in options]


def options_from_args(args: argparse.Namespace) -> dict:
    """The engine options a parsed command line holds (all of them, defaults included), but the model."""
    return {name: getattr(args, name) for name in engine_options() if name != "model"}


def options_table(options: Iterable[Option]) -> str:
    """A markdown table of options, as docs/options.md shows them."""
    rows = ["| option | flag | default | allowed | meaning |", "|---|---|---|---|---|"]
    for option in options:
        spec = option.field
        flag = f"`{option.flag}`" + (f" `{spec.metadata['short']}`" if spec.metadata["short"] else "")
        allowed = ", ".join(f"`{c}`" for c in option.choices) if option.choices else ""
        meaning = option.help.replace("|", "\\|")
        rows.append(f"| `{option.name}` | {flag} | `{spec.default!r}` | {allowed} | {meaning} |")
    return "\n".join(rows) + "\n"
