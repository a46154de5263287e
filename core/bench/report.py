"""What the benchmark commands share: latency percentiles, and printing/saving a result."""
from __future__ import annotations

import json

import numpy as np

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


def parse_percentiles(text: str) -> tuple[float, ...]:
    """'50,90,99' -> (50.0, 90.0, 99.0); each must be in (0, 100]."""
    try:
        ps = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"percentiles must be comma-separated numbers like 50,90,99, got {text!r}") from None
    if not all(0 < p <= 100 for p in ps):
        raise ValueError(f"percentiles must each be in (0, 100], got {text!r}")
    return ps


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as the reports and --dtype spell it."""
    return str(dtype).removeprefix("torch.")


def percentile_name(p: float) -> str:
    return f"p{p:g}"


def percentiles(values_seconds, ps=DEFAULT_PERCENTILES) -> dict:
    """mean, median and each percentile of ``values_seconds``, in milliseconds; None for all when there are
    no values (a 0 would read as a measurement)."""
    names = ["mean", "median", *map(percentile_name, ps)]
    if len(values_seconds) == 0:
        return dict.fromkeys(names)
    ms = np.asarray(values_seconds, dtype=np.float64) * 1000
    stats = [ms.mean(), np.median(ms), *np.percentile(ms, ps)]
    return {name: round(float(v), 3) for name, v in zip(names, stats)}


def _text(value) -> str:
    return "-" if value is None else str(value)


def format_text(result: dict, title: str | None = None) -> str:
    """Scalars first, in order, as `key: value` lines; then one block per nested dict or list."""
    width = max((len(str(k)) for k in _flat_keys(result)), default=0) + 2
    lines = [f"{' ' + title + ' ':=^{max(width + 20, 40)}}"] if title else []
    for key, value in result.items():
        if not isinstance(value, (dict, list)):
            lines.append(f"{key + ':':<{width}}{_text(value)}")
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f"{' ' + key + ' ':-^{max(width + 20, 40)}}")
            lines += [f"{str(k) + ':':<{width}}{_text(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value:
            lines.append(f"{' ' + key + ' ':-^{max(width + 20, 40)}}")
            lines += [f"  {_text(v)}" for v in value]
    return "\n".join(lines)


def _flat_keys(result: dict):
    for key, value in result.items():
        yield key
        if isinstance(value, dict):
            yield from value


def emit(result: dict, output_json: str | None, title: str | None = None) -> None:
    """Print ``result`` as a text table to stdout and, given a path, save it there as JSON."""
    print(format_text(result, title), flush=True)
    if output_json:
        with open(output_json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
