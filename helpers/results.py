"""A notebook's key numbers, each recorded as a claim, a control, a check or a plain measurement.

    results.record("pentagon gap (deg)", gap, expected=72, tolerance=6, kind="claim",
                   source="Elhage et al. 2022, fig. 2", criterion="ours: within 6 deg of 72")
    results.record("zero vector changes nothing", dmax, expected=0.0, tolerance=1e-6, kind="control")
    results.report("01_toy_superposition")   # one table per kind; runs/01_toy_superposition.results.json

Kinds (rules in notebooks/README.md):
- **claim**: a published result. `source` is required; `expected` is the paper's own number or direction.
  A numeric threshold needs `criterion="paper: ..."` or `criterion="ours: ..."` (ours when the paper never
  stated it). Verdict: "reproduced" / "not reproduced" / "no published value" (no `expected`).
- **control**: a control that must behave as a control does. Verdict: "as expected" / "FAILED".
- **check**: an identity or sanity check. Verdict: "pass" / "FAIL".
- **measurement**: a number worth reporting with no verdict.

Uncertainty rides along as `ci=(low, high)`, `se=`, `p=`, `n=`; `drift=` says how far the number may move
between runs (threads, machines) before the regression test against tests/baselines/ fails.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from helpers.paths import BASELINES, RUNS

KINDS = ("claim", "control", "check", "measurement")
PASS_WORD = {"claim": "reproduced", "control": "as expected", "check": "pass"}
FAIL_WORD = {"claim": "not reproduced", "control": "FAILED", "check": "FAIL"}
NO_EXPECTATION = {"claim": "no published value", "control": "-", "check": "-", "measurement": "-"}
DEFAULT_REL_DRIFT = 0.05   # a float may move by 5% of its baseline (or DEFAULT_ABS_DRIFT) unless `drift=` says otherwise
DEFAULT_ABS_DRIFT = 1e-3

_CONTEXT: dict[str, Any] = {}
_RECORDS: dict[str, "Record"] = {}
_START: dict[str, float] = {}


class RegressionError(AssertionError):
    """A notebook's fresh records disagree with its committed baseline (a verdict flipped, a number moved)."""


@dataclass
class Record:
    key: str
    value: Any
    kind: str = "measurement"
    expected: Any = None
    source: str | None = None
    tolerance: float | None = None
    criterion: str | None = None
    ci: tuple[float, float] | None = None
    se: float | None = None
    p: float | None = None
    n: int | None = None
    note: str | None = None
    drift: float | None = None
    verdict: str = field(default="-")
    passed: bool | None = None


@dataclass(frozen=True)
class Saved:
    """What `report` wrote; prints as a repo-relative path (no local absolute path in a notebook's output)."""
    path: Path

    def __repr__(self) -> str:
        try:
            return f"saved {self.path.resolve().relative_to(RUNS.parent)}"
        except ValueError:
            return f"saved {self.path.name}"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def set_context(**context: Any) -> None:
    """Remember what produced the numbers (model, seed, fast ...); `helpers.setup` and `load_model` call this."""
    _CONTEXT.update(context)


def context() -> dict[str, Any]:
    return dict(_CONTEXT)


def clear() -> None:
    """Forget every record (the context stays)."""
    _RECORDS.clear()


def start_clock() -> None:
    """Start the run's wall clock (`helpers.setup` calls this); `report` prints the time since."""
    _START["t"] = time.perf_counter()


def run_cost() -> dict[str, float]:
    """Wall time since `start_clock` (seconds) and this process's peak resident memory (GB), both measured."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_gb = rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9   # bytes on macOS, KiB on Linux
    wall = time.perf_counter() - _START["t"] if "t" in _START else float("nan")
    cost = {"wall_s": round(wall, 1), "peak_memory_gb": round(peak_gb, 2)}
    torch = sys.modules.get("torch")   # never imported here just to ask: a toy notebook may not need it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak_gpu = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        cost["peak_gpu_memory_gb"] = round(peak_gpu / 1e9, 2)   # tensors allocated by torch, every GPU together
    return cost


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


def compare(value: Any, expected: Any, tolerance: float | None = None) -> bool | None:
    """True when `value` meets `expected` (within `tolerance` of a number, inside a (low, high) range, equal
    to a bool or str), False when not, None when there is no expectation."""
    if expected is None:
        return None
    if isinstance(expected, bool) or isinstance(value, bool) or isinstance(expected, str):
        return value == expected
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if isinstance(expected, (tuple, list)) and len(expected) == 2:
        low, high = expected
        return (low is None or value >= low) and (high is None or value <= high)
    if isinstance(expected, (int, float)):
        tol = tolerance if tolerance is not None else 0.1 * abs(expected)
        return abs(value - expected) <= tol
    raise TypeError(f"expected must be a number, a (low, high) range, a bool or a str; got {expected!r}")


def verdict(value: Any, expected: Any, tolerance: float | None = None, kind: str = "claim") -> str:
    """The verdict word for `kind`: claim 'reproduced' / 'not reproduced', control 'as expected' / 'FAILED',
    check 'pass' / 'FAIL'; '-' (or 'no published value' for a claim) without an expectation."""
    ok = compare(value, expected, tolerance)
    if ok is None or kind == "measurement":
        return NO_EXPECTATION[kind]
    return PASS_WORD[kind] if ok else FAIL_WORD[kind]


def _check_arguments(kind: str, expected: Any, source: str | None, criterion: str | None,
                     tolerance: float | None, ci: Any, p: Any, n: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if tolerance is not None and (not isinstance(tolerance, (int, float)) or tolerance < 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if kind == "claim" and not source:
        raise ValueError("a claim needs source= (the paper and where in it); a number with no published "
                         "result behind it is kind='measurement'")
    numeric = expected is not None and not isinstance(expected, (bool, str))
    if kind == "claim" and numeric and not (criterion and criterion.split(":")[0].strip() in ("paper", "ours")):
        raise ValueError("a claim with a numeric threshold needs criterion='paper: ...' (the paper's own number) "
                         "or criterion='ours: ...' (a threshold the paper never stated)")
    if kind in ("control", "check") and expected is None:
        raise ValueError(f"a {kind} needs expected= (what it must show)")
    if kind == "measurement" and expected is not None:
        raise ValueError("a measurement has no expected value; use kind='claim', 'control' or 'check'")
    if ci is not None and (len(ci) != 2 or ci[0] > ci[1]):
        raise ValueError(f"ci must be (low, high) with low <= high, got {ci!r}")
    if p is not None and not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int, got {n!r}")


def record(key: str, value: Any, expected: Any = None, source: str | None = None,
           tolerance: float | None = None, note: str | None = None, *, kind: str, criterion: str | None = None,
           ci: tuple[float, float] | None = None, se: float | None = None, p: float | None = None,
           n: int | None = None, drift: float | None = None) -> Any:
    """Store one key number as a claim, control, check or measurement; returns `value` unchanged."""
    if not isinstance(key, str) or not key:
        raise TypeError("key must be a non-empty str")
    plain, exp = _plain(value), _plain(expected)
    ci, se, p, n = _plain(ci), _plain(se), _plain(p), _plain(n)
    _check_arguments(kind, exp, source, criterion, tolerance, ci, p, n)
    if drift is not None and (not isinstance(drift, (int, float)) or drift < 0):
        raise ValueError(f"drift must be a number >= 0, got {drift!r}")
    rec = Record(key=key, value=plain, kind=kind, expected=exp, source=source, tolerance=tolerance,
                 criterion=criterion, ci=tuple(ci) if ci is not None else None, se=se, p=p, n=n, note=note,
                 drift=drift)
    rec.passed = None if kind == "measurement" else compare(plain, exp, tolerance)
    rec.verdict = verdict(plain, exp, tolerance, kind)
    _RECORDS[key] = rec
    return value


def records(kind: str | None = None) -> list[Record]:
    return [r for r in _RECORDS.values() if kind is None or r.kind == kind]


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


def uncertainty(r: Record | dict, digits: int = 2) -> str:
    """'95% CI [a, b]; s.e. x; p = y; n = z' from whichever of those the record carries."""
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    parts = []
    if get("ci") is not None:
        parts.append(f"CI {_fmt(list(get('ci')), digits)}")
    if get("se") is not None:
        parts.append(f"s.e. {_fmt(get('se'), digits)}")
    if get("p") is not None:
        parts.append(f"p = {_fmt(get('p'), digits)}")
    if get("n") is not None:
        parts.append(f"n = {get('n')}")
    return "; ".join(parts)


def _expected_text(r: Record | dict, digits: int) -> str:
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    text = _fmt(get("expected"), digits)
    if get("tolerance") is not None and get("expected") is not None:
        text += f" ± {_fmt(get('tolerance'), digits)}"
    return text


def table(digits: int = 3, kind: str | None = None):
    """The records (of one kind, or all) as a pandas DataFrame, numbers rounded for reading."""
    import pandas as pd

    rows = [dict(kind=r.kind, key=r.key, value=_fmt(r.value, digits), uncertainty=uncertainty(r),
                 expected=_expected_text(r, digits), criterion=r.criterion or "", verdict=r.verdict,
                 source=r.source or "", note=r.note or "") for r in records(kind)]
    return pd.DataFrame(rows, columns=["kind", "key", "value", "uncertainty", "expected", "criterion", "verdict",
                                       "source", "note"])


def summary_line(recs: list[Record] | list[dict] | None = None) -> str:
    """'claims: X reproduced, Y not reproduced, Z without a published value; controls: ...; checks: ...'."""
    recs = [asdict(r) if isinstance(r, Record) else r for r in (records() if recs is None else recs)]
    claims = [r for r in recs if r.get("kind") == "claim"]
    n_rep = sum(r["verdict"] == "reproduced" for r in claims)
    n_not = sum(r["verdict"] == "not reproduced" for r in claims)
    parts = [f"claims: {n_rep} reproduced, {n_not} not reproduced, {len(claims) - n_rep - n_not} without a published value"]
    for kind, plural in (("control", "controls"), ("check", "checks")):
        rows = [r for r in recs if r.get("kind") == kind]
        failed = [r["key"] for r in rows if r.get("passed") is False]
        if rows:
            good = "as expected" if kind == "control" else "pass"
            parts.append(f"{plural}: all {len(rows)} {good}" if not failed
                         else f"{plural}: {len(failed)} of {len(rows)} failed ({'; '.join(failed)})")
    n_meas = sum(r.get("kind") == "measurement" for r in recs)
    if n_meas:
        parts.append(f"measurements: {n_meas}")
    return "; ".join(parts)


def _print_tables(frame, width: int = 60) -> None:
    import pandas as pd

    titles = {"claim": "Claims (published results)", "control": "Controls", "check": "Checks (identities, sanity)",
              "measurement": "Measurements (no verdict)"}
    with pd.option_context("display.max_colwidth", width, "display.width", 250, "display.max_rows", 500):
        for kind in KINDS:
            part = frame[frame.kind == kind].drop(columns="kind")
            if not len(part):
                continue
            keep = [c for c in part.columns if c in ("key", "value", "verdict") or (part[c] != "").any()]
            print(f"\n{titles[kind]}")
            print(part[keep].to_string(index=False))


def report(notebook: str, digits: int = 3, folder: Path | None = None) -> Saved:
    """Print one table per kind, the claims-only summary and the run's measured cost; write
    runs/<notebook>.results.json. With $WORKBOOK_CHECK_BASELINE set (as `make test` does) compare with
    tests/baselines/<notebook>.json and raise RegressionError on a flipped verdict or a moved number; with
    $WORKBOOK_WRITE_BASELINE set (as `make notebooks` does) write that baseline."""
    cost = run_cost()
    ctx = ", ".join(f"{k}={v}" for k, v in _CONTEXT.items())
    print(f"Results of {notebook} ({ctx})")
    _print_tables(table(digits))
    print("\n" + summary_line())
    gpu = f", peak GPU memory {cost['peak_gpu_memory_gb']:.1f} GB" if "peak_gpu_memory_gb" in cost else ""
    print(f"This run: {cost['wall_s']:.0f} s wall time since setup(), peak memory {cost['peak_memory_gb']:.1f} GB{gpu} "
          f"(measured by this kernel, {_CONTEXT.get('threads', '?')} torch threads).")
    folder = Path(folder or os.environ.get("WORKBOOK_RUNS", RUNS))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{notebook}.results.json"
    payload = {"notebook": notebook, "context": {k: _plain(v) for k, v in _CONTEXT.items()}, "cost": cost,
               "records": [asdict(r) for r in records()]}
    path.write_text(json.dumps(payload, indent=1, default=str))
    if _flag("WORKBOOK_WRITE_BASELINE"):
        write_baseline(payload)
    if _flag("WORKBOOK_CHECK_BASELINE"):
        problems = check_against_baseline(payload)
        if problems:
            raise RegressionError(f"{notebook}: {len(problems)} result(s) differ from tests/baselines/{notebook}.json\n"
                                  + "\n".join(problems))
        print(f"Regression check: every record matches tests/baselines/{notebook}.json")
    return Saved(path)


# ---------------------------------------------------------------- regression baselines

# a baseline applies only to runs with the same settings; fast_paths: the bridge's fast paths (helpers.fast_bridge),
# set by load_model (None in a notebook that loads no bridge), since some fits amplify their float rounding (07)
BASELINE_CONTEXT = ("model", "seed", "fast", "fast_paths")


def write_baseline(payload: dict[str, Any], folder: Path | None = None) -> Path:
    """Save value, kind, verdict and drift of every record as tests/baselines/<notebook>.json."""
    folder = Path(folder or BASELINES)
    folder.mkdir(parents=True, exist_ok=True)
    keep = ("value", "kind", "verdict", "passed", "drift")
    base = {"notebook": payload["notebook"],
            "context": {k: payload["context"].get(k) for k in BASELINE_CONTEXT},
            "records": {r["key"]: {k: r[k] for k in keep} for r in payload["records"]}}
    path = folder / f"{payload['notebook']}.json"
    path.write_text(json.dumps(base, indent=1, default=str, sort_keys=False) + "\n")
    return path


def allowed_drift(baseline_value: Any, drift: float | None) -> float:
    """How far a number may move: the record's own `drift`, else 5% of the baseline (at least 1e-3) for
    floats and 0 for ints."""
    if drift is not None:
        return float(drift)
    if isinstance(baseline_value, float):
        return max(DEFAULT_REL_DRIFT * abs(baseline_value), DEFAULT_ABS_DRIFT)
    return 0.0


def _moved(old: Any, new: Any, drift: float | None) -> bool:
    if isinstance(old, bool) or isinstance(new, bool) or isinstance(old, str) or old is None or new is None:
        return old != new
    if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
        if not isinstance(old, (list, tuple)) or not isinstance(new, (list, tuple)) or len(old) != len(new):
            return True
        return any(_moved(a, b, drift) for a, b in zip(old, new))
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        if isinstance(old, float) and math.isnan(old):
            return not (isinstance(new, float) and math.isnan(new))
        return abs(new - old) > allowed_drift(old, drift) + 1e-12
    return old != new


def check_against_baseline(payload: dict[str, Any], folder: Path | None = None) -> list[str]:
    """Readable differences between a fresh run and its baseline ('key: baseline ... now ...'); empty when
    they agree, or when no baseline applies (missing, or made with another model / seed / FAST)."""
    path = Path(folder or BASELINES) / f"{payload['notebook']}.json"
    if not path.exists():
        return []
    base = json.loads(path.read_text())
    ctx = {k: payload["context"].get(k) for k in BASELINE_CONTEXT}
    if base["context"] != ctx:
        print(f"(no regression check: the baseline is for {base['context']}, this run is {ctx})")
        return []
    now = {r["key"]: r for r in payload["records"]}
    problems = []
    for key, old in base["records"].items():
        if key not in now:
            problems.append(f"  {key}: in the baseline, missing now")
            continue
        new = now[key]
        if old["kind"] != new["kind"]:
            problems.append(f"  {key}: kind {old['kind']} -> {new['kind']}")
        if old["verdict"] != new["verdict"]:
            problems.append(f"  {key}: verdict flipped: baseline {old['verdict']!r} (value {_fmt(old['value'])}), "
                            f"now {new['verdict']!r} (value {_fmt(new['value'])})")
        elif _moved(old["value"], new["value"], old.get("drift")):
            limit = allowed_drift(old["value"], old.get("drift")) if isinstance(old["value"], (int, float)) else 0
            problems.append(f"  {key}: value moved: baseline {_fmt(old['value'], 5)}, now {_fmt(new['value'], 5)} "
                            f"(allowed drift {_fmt(limit)})")
    for key in now.keys() - base["records"].keys():
        problems.append(f"  {key}: new record, not in the baseline (re-run `make notebooks NB=..`)")
    return problems


# ---------------------------------------------------------------- across notebooks

def load_all(folder: Path | None = None) -> list[dict[str, Any]]:
    """Every saved results file in `folder` (default runs/), as dicts."""
    folder = Path(folder or os.environ.get("WORKBOOK_RUNS", RUNS))
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.results.json"))]


def combined_table(folder: Path | None = None, runs: list[dict[str, Any]] | None = None):
    """One DataFrame of every notebook's records (kind, verdict, uncertainty) and the model behind them."""
    import pandas as pd

    rows = []
    for run in load_all(folder) if runs is None else runs:
        for r in run["records"]:
            rows.append(dict(notebook=run["notebook"], model=run["context"].get("model", ""), kind=r.get("kind", ""),
                             key=r["key"], value=_fmt(r["value"]), uncertainty=uncertainty(r),
                             expected=_expected_text(r, 3), verdict=r["verdict"]))
    return pd.DataFrame(rows, columns=["notebook", "model", "kind", "key", "value", "uncertainty", "expected", "verdict"])


def combined_report(names: list[str] | None = None, folder: Path | None = None) -> str:
    """The summary across notebooks (claims only count as reproduced), then one table per kind."""
    runs = [r for r in load_all(folder) if names is None or r["notebook"] in names]
    frame = combined_table(runs=runs)
    lines = [f"{run['notebook']:<34} {summary_line(run['records'])}" for run in runs]
    everything = [r for run in runs for r in run["records"]]
    lines.append(f"{'all notebooks':<34} {summary_line(everything)}")
    print("\n".join(lines))
    _print_tables(frame.drop(columns=["model"]), width=50)
    return "\n".join(lines)
