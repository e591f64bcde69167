"""Collect a notebook's key numbers, compare them with published values, and save them.

    results.record("pentagon gap (deg)", gap, expected=72, tolerance=6, source="Elhage et al. 2022, fig. 2")
    results.record("real blows up before random", True, expected=True, source="Heimersheim & Mendel 2024")
    results.report("01_toy_superposition")   # prints the table, writes runs/01_toy_superposition.results.json

A verdict is "reproduced" when the value is within `tolerance` of `expected` (a number), inside
`expected` (a (low, high) range), or equal to it (a bool or a string); "not reproduced" otherwise, and
"-" when there is nothing to compare with.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from helpers.env import RUNS

_CONTEXT: dict[str, Any] = {}
_RECORDS: dict[str, "Record"] = {}


@dataclass
class Record:
    key: str
    value: Any
    expected: Any = None
    source: str | None = None
    tolerance: float | None = None
    note: str | None = None
    verdict: str = field(default="-")


def set_context(**context: Any) -> None:
    """Remember what produced the numbers (model, seed, fast ...); `helpers.setup` and `load_model` call this."""
    _CONTEXT.update(context)


def context() -> dict[str, Any]:
    return dict(_CONTEXT)


def clear() -> None:
    """Forget every record (the context stays)."""
    _RECORDS.clear()


def _plain(value: Any) -> Any:
    """Turn numpy / torch scalars into plain python numbers, so records are JSON-able."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def verdict(value: Any, expected: Any, tolerance: float | None = None) -> str:
    """'reproduced', 'not reproduced', or '-' when there is no expectation."""
    if expected is None:
        return "-"
    if isinstance(expected, bool) or isinstance(value, bool) or isinstance(expected, str):
        return "reproduced" if value == expected else "not reproduced"
    if isinstance(expected, (tuple, list)) and len(expected) == 2:
        low, high = expected
        ok = (low is None or value >= low) and (high is None or value <= high)
        return "reproduced" if ok else "not reproduced"
    if isinstance(expected, (int, float)):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "not reproduced"
        tol = tolerance if tolerance is not None else 0.1 * abs(expected)
        return "reproduced" if abs(value - expected) <= tol else "not reproduced"
    raise TypeError(f"expected must be a number, a (low, high) range, a bool or a str; got {expected!r}")


def record(key: str, value: Any, expected: Any = None, source: str | None = None,
           tolerance: float | None = None, note: str | None = None) -> Any:
    """Store one key number (and what the literature expects of it); returns `value` unchanged."""
    if not isinstance(key, str) or not key:
        raise TypeError("key must be a non-empty str")
    if tolerance is not None and (not isinstance(tolerance, (int, float)) or tolerance < 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    plain, exp = _plain(value), _plain(expected)
    rec = Record(key=key, value=plain, expected=exp, source=source, tolerance=tolerance, note=note)
    rec.verdict = verdict(plain, exp, tolerance)
    _RECORDS[key] = rec
    return value


def records() -> list[Record]:
    return list(_RECORDS.values())


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return str(value)


def table(digits: int = 3):
    """The records as a pandas DataFrame (numbers rounded for reading)."""
    import pandas as pd

    rows = []
    for r in records():
        expected = _fmt(r.expected, digits)
        if r.tolerance is not None and r.expected is not None:
            expected += f" ± {_fmt(r.tolerance, digits)}"
        rows.append(dict(key=r.key, value=_fmt(r.value, digits), expected=expected,
                         verdict=r.verdict, source=r.source or ""))
    return pd.DataFrame(rows, columns=["key", "value", "expected", "verdict", "source"])


def summary_line() -> str:
    verdicts = [r.verdict for r in records()]
    n_rep, n_not = verdicts.count("reproduced"), verdicts.count("not reproduced")
    return f"{len(verdicts)} results; {n_rep} reproduced, {n_not} not reproduced, {len(verdicts) - n_rep - n_not} without a published value"


def report(notebook: str, digits: int = 3, folder: Path | None = None) -> Path:
    """Print the results table and write it as JSON (runs/<notebook>.results.json); returns the path."""
    import pandas as pd

    ctx = ", ".join(f"{k}={v}" for k, v in _CONTEXT.items())
    print(f"Results of {notebook} ({ctx})")
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(table(digits).to_string(index=False))
    print(summary_line())
    folder = Path(folder or os.environ.get("WORKBOOK_RUNS", RUNS))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{notebook}.results.json"
    payload = {"notebook": notebook, "context": {k: _plain(v) for k, v in _CONTEXT.items()},
               "records": [asdict(r) for r in records()]}
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def load_all(folder: Path | None = None) -> list[dict[str, Any]]:
    """Every saved results file in `folder` (default runs/), as dicts."""
    folder = Path(folder or os.environ.get("WORKBOOK_RUNS", RUNS))
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.results.json"))]


def combined_table(folder: Path | None = None):
    """One DataFrame of every notebook's key results and the model that produced them."""
    import pandas as pd

    rows = []
    for run in load_all(folder):
        for r in run["records"]:
            rows.append(dict(notebook=run["notebook"], model=run["context"].get("model", ""),
                             key=r["key"], value=_fmt(r["value"]), expected=_fmt(r["expected"]),
                             verdict=r["verdict"]))
    return pd.DataFrame(rows, columns=["notebook", "model", "key", "value", "expected", "verdict"])
