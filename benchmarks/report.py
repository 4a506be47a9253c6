"""What the benchmark scripts share: a spread of timings, the machine, and their JSON in results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MACHINE = f"{platform.machine()} {os.cpu_count()} cpu"


def spread_ms(values: list[float], every: bool = False) -> dict:
    """Median, min and max of timings in ms, to 0.01 (`every`: each one too)."""
    out = {"median_ms": round(statistics.median(values), 2), "min_ms": round(min(values), 2),
           "max_ms": round(max(values), 2)}
    return {**out, "all_ms": [round(x, 2) for x in values]} if every else out


def spread_text(s: dict, width: int = 8) -> str:
    """A spread_ms as "median (min-max)"."""
    return f"{s['median_ms']:{width}.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f})"


def save(name: str, result: dict, indent: int = 1) -> Path:
    """Write `result` as results/<name> and say where."""
    out = RESULTS / name
    out.write_text(json.dumps(result, indent=indent))
    print(f"wrote {out}")
    return out
