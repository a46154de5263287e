"""Options as config fields declare them (option()), and the checks of their values that errors name them by."""
from __future__ import annotations

import re
from dataclasses import Field, dataclass, field, fields
from typing import Any

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def option(default: Any, help: str, *, name: str | None = None, choices: Any = None, short: str | None = None,
           parse: Any = None) -> Any:
    """A config field that users set, as ``LLM(name=...)`` and ``--name``. ``name`` defaults to the field's;
    ``short`` is a flag alias; ``parse`` names how the command line reads the value ("json", "template"), where
    its type does not say; ``choices`` are the allowed values. The help, default and choices show in ``--help``
    and in docs/options.md."""
    return field(default=default, metadata={"help": help, "name": name, "choices": choices, "short": short,
                                            "parse": parse})


def check_int(name: str, value: Any, low: int, high: int | None = None, allow_none: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int in [low, high]."""
    if value is None and allow_none:
        return
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {bound}, got {value}")


def parse_size(name: str, value: int | str) -> int:
    """Bytes from an int or a string like '4GiB', '512 MiB', '2G'."""
    if isinstance(value, int) and not isinstance(value, bool):
        check_int(name, value, 1)
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{name} must be a byte count like 4GiB, 512MiB or 1073741824, got {value!r}")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    check_int(name, size, 1)
    return size


def parse_gib(name: str, value: float | str) -> int:
    """Bytes from a number of GiB (vLLM's unit for swap_space) or a size string like '512MiB'."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        number = float(value)
    if number is None:
        return parse_size(name, value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{name} must be a number of GiB >= 0 or a size like 512MiB, got {value!r}")
    return int(number * (1 << 30))


@dataclass(frozen=True)
class Option:
    name: str
    section: str | None     # the EngineConfig field of its config, or None for EngineConfig's own
    owner: type             # the config class that declares it
    field: Field

    @property
    def help(self) -> str:
        return self.field.metadata["help"]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple | None:
        return self.field.metadata["choices"]


def class_options(owner: type, section: str | None = None) -> list[Option]:
    """The options a config class declares with option(), in its field order."""
    return [Option(spec.metadata["name"] or spec.name, section, owner, spec) for spec in fields(owner)
            if "help" in spec.metadata]
