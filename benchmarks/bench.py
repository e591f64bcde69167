"""Benchmark the default model and the notebooks on this machine: `make bench` (or `python benchmarks/bench.py`).

Measures, each in a fresh subprocess so times and peak memory are not polluted by earlier steps:
1. cold load (dequantizing the GGUF into an empty cache) vs cached load of the default model;
2. forward throughput (tokens/s) at one batch shape: raw transformers, the TransformerLens bridge,
   `run_with_cache` with a names filter (the residual stream of every layer), and with no filter;
3. the wall time and peak memory of each notebook (papermill, default parameters).
Prints a markdown table to paste into the README's performance section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD_SNIPPET = """
import json, resource, time
t0 = time.perf_counter()
import helpers
t1 = time.perf_counter()
helpers.setup(0, quiet=True)
from transformer_lens.model_bridge import TransformerBridge  # library imports, paid once per process
from transformers import AutoModelForCausalLM, LlamaForCausalLM
t2 = time.perf_counter()
helpers.load_model(verbose=False)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "lib_import_s": t2 - t1, "load_s": t3 - t2,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

THROUGHPUT_SNIPPET = """
import json, resource, statistics, time, torch
import helpers
from helpers import interventions as I
helpers.setup(0)
BATCH, SEQ, REPEATS = {batch}, {seq}, {repeats}
hf, _ = helpers.load_hf()
bridge = helpers.load_model(verbose=False)
tokens = torch.randint(100, 40000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
names = [I.resid_name(bridge, l) for l in range(bridge.cfg.n_layers + 1)]
runs = {{
    "transformers (raw HF model)": lambda: hf(tokens).logits,
    "TransformerLens bridge": lambda: bridge(tokens),
    "run_with_cache, names filter (resid, all layers)": lambda: bridge.run_with_cache(tokens, names_filter=lambda n: n in names),
    "run_with_cache, every hook": lambda: bridge.run_with_cache(tokens),
}}
out = {{}}
with torch.no_grad():
    for label, fn in runs.items():
        fn()  # warm up
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
        out[label] = BATCH * SEQ / statistics.median(times)
print(json.dumps({{"tokens_per_s": out, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run_python(code: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_loads() -> dict:
    with tempfile.TemporaryDirectory() as empty:
        cold = run_python(LOAD_SNIPPET, env={"WORKBOOK_CACHE": empty})
    run_python(LOAD_SNIPPET)  # make sure the real cache exists
    warm = [run_python(LOAD_SNIPPET) for _ in range(3)]
    warm_best = min(warm, key=lambda r: r["load_s"])
    return {"cold": cold, "cached": warm_best}


def bench_notebook(name: str) -> dict:
    """Wall time and peak RSS (the kernel included) of one notebook run by papermill."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "helpers.runner", "--nb", name, "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    ok = os.waitstatus_to_exitcode(status) == 0
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "ok": ok, "log": output[-500:] if not ok else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-notebooks", action="store_true")
    parser.add_argument("--nb", nargs="*", help="only these notebooks")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import torch

    threads = os.environ.get("WORKBOOK_THREADS") or min(len(os.sched_getaffinity(0)), 8)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
          f" {threads} threads\n")
    report: dict = {}
    loads = bench_loads()
    report["loads"] = loads
    print("| measurement | value |\n|---|---|")
    print(f"| import helpers, fresh process | {loads['cached']['import_s']:.1f} s |")
    print(f"| import transformers + TransformerLens model code, once per process | {loads['cached']['lib_import_s']:.1f} s |")
    print(f"| cold load (dequantize GGUF, write cache) | {loads['cold']['load_s']:.1f} s |")
    print(f"| cached load | {loads['cached']['load_s']:.1f} s |")
    print(f"| peak memory, process after a cached load | {loads['cached']['peak_mb']:.0f} MB |")

    tp = run_python(THROUGHPUT_SNIPPET.format(batch=args.batch, seq=args.seq, repeats=args.repeats))
    report["throughput"] = tp
    for label, value in tp["tokens_per_s"].items():
        print(f"| forward {args.batch}x{args.seq} tokens: {label} | {value:,.0f} tokens/s |")
    print(f"| peak memory, throughput process (HF model + bridge) | {tp['peak_mb']:.0f} MB |")

    if not args.skip_notebooks:
        sys.path.insert(0, str(ROOT))
        from helpers.runner import find_notebooks

        report["notebooks"] = {}
        print("\n| notebook | wall time | peak memory | status |\n|---|---|---|---|")
        for path in find_notebooks(args.nb):
            r = bench_notebook(path.stem)
            report["notebooks"][path.stem] = r
            print(f"| {path.stem} | {r['seconds']:.0f} s | {r['peak_mb']:.0f} MB | {'ok' if r['ok'] else 'FAILED'} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
