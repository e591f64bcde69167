"""Benchmark the default model and the notebooks on this machine: `make bench` (or `python benchmarks/bench.py`).

Measures, each in a fresh subprocess so times and peak memory are not polluted by earlier steps:
1. cold load (dequantizing the GGUF into an empty cache) vs cached load of the default model;
2. forward throughput (tokens/s) at one batch shape (and a 1 x 16 prompt, where per-call overhead shows), round
   robin so machine noise hits every row alike, time / raw as the median of each round's own ratio: raw
   transformers (SDPA and eager attention), the TransformerLens bridge with the workbook's fast paths and with
   TransformerLens's own (`load_model(fast=False)`), `run_with_cache` with a names filter,
   a steering and a patching forward through `helpers.interventions`, the same reads and steering as plain
   forward hooks on the Hugging Face modules, and nnsight (optional: `pip install nnsight`);
3. one representative sweep (a perturbation curve) batched vs one forward pass per point;
4. the wall time and peak memory of each notebook (papermill, default parameters).
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
helpers.setup(0, quiet=True)
BATCH, SEQ, REPEATS = {batch}, {seq}, {repeats}
hf, _ = helpers.load_hf()                      # the raw Hugging Face model (SDPA attention)
hf_eager, _ = helpers.load_hf()
hf_eager.config._attn_implementation = "eager"  # the attention the bridge reimplements step by step
bridge = helpers.load_model(verbose=False)             # with the fast paths (helpers.fast_bridge), the default
bridge_tl = helpers.load_model(fast=False, verbose=False)  # TransformerLens's own attention and norms
tokens = torch.randint(100, 40000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
n = bridge.cfg.n_layers
names = [I.resid_name(bridge, l) for l in range(n + 1)]
vec = torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(1))
mid = n // 2
_, cache = bridge.run_with_cache(tokens, names_filter=lambda x: x == names[mid])
source = {{names[mid]: cache[names[mid]]}}

def hf_read_all():
    store = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: store.append(a[0])) for layer in hf.model.layers]
    try:
        return hf(tokens).logits, store
    finally:
        for h in hooks: h.remove()

def hf_steer():
    h = hf.model.layers[mid].register_forward_pre_hook(lambda m, a: (a[0] + vec,) + tuple(a[1:]))
    try:
        return hf(tokens).logits
    finally:
        h.remove()

runs = {{
    "transformers (raw HF model, SDPA attention)": lambda: hf(tokens).logits,
    "transformers, eager attention": lambda: hf_eager(tokens).logits,
    "TransformerLens bridge": lambda: bridge(tokens),
    "bridge, TransformerLens's own paths (load_model(fast=False))": lambda: bridge_tl(tokens),
    "bridge run_with_cache, names filter (resid, all layers)": lambda: bridge.run_with_cache(tokens, names_filter=lambda x: x in names),
    "bridge steering: interventions.add_vector at one layer": lambda: I.add_vector(bridge, tokens, vec, mid, return_pos=None),
    "bridge patching: interventions.patch of one layer's resid": lambda: I.patch(bridge, tokens, source, return_pos=None),
    "bridge run_with_cache, TransformerLens's own paths": lambda: bridge_tl.run_with_cache(tokens, names_filter=lambda x: x in names),
    "HF forward hooks: read every layer's resid": hf_read_all,
    "HF forward hook: steer one layer": hf_steer,
}}
try:
    from nnsight import NNsight
    nn_model = NNsight(hf)
    def nnsight_read_all():
        with nn_model.trace(tokens):
            outs = list().save()
            for i in range(n):
                outs.append(nn_model.model.layers[i].output)
            logits = nn_model.lm_head.output.save()
        return logits, outs
    def nnsight_steer():
        with nn_model.trace(tokens):
            nn_model.model.layers[mid].output[:] += vec
            logits = nn_model.lm_head.output.save()
        return logits
    runs["nnsight trace saving every layer's output"] = nnsight_read_all
    runs["nnsight trace, one in-place steering"] = nnsight_steer
except ImportError:  # nnsight is an optional benchmark dependency: pip install nnsight
    pass
small = tokens[:1, :16]  # one short prompt: where the bridge's per-call Python overhead shows
small_runs = {{"transformers (raw HF model, SDPA attention), 1 x 16 tokens": lambda: hf(small).logits,
              "TransformerLens bridge, 1 x 16 tokens": lambda: bridge(small),
              "bridge, TransformerLens's own paths, 1 x 16 tokens": lambda: bridge_tl(small)}}
times = {{label: [] for label in list(runs) + list(small_runs)}}
with torch.no_grad():
    for fn in list(runs.values()) + list(small_runs.values()):
        fn()  # warm up
    for _ in range(REPEATS):  # round robin, so a slow moment of the machine hits every row alike
        for label, fn in runs.items():
            t0 = time.perf_counter(); fn(); times[label].append(time.perf_counter() - t0)
        for label, fn in small_runs.items():
            t0 = time.perf_counter()
            for _ in range(10): fn()
            times[label].append((time.perf_counter() - t0) / 10)
    fast, own, raw = bridge(tokens), bridge_tl(tokens), hf(tokens).logits
agree = {{"max_abs_fast_vs_own": float((fast - own).abs().max()), "max_abs_raw_vs_own": float((raw - own).abs().max()),
         "logit_scale": float(own.abs().max())}}
first_small = next(iter(small_runs))
out = {{label: (16 if label in small_runs else BATCH * SEQ) / statistics.median(t) for label, t in times.items()}}
# time / raw within each round (the same moment of the machine), then the median over rounds
paired = {{label: statistics.median(a / b for a, b in zip(t, times[first_small if label in small_runs else next(iter(runs))]))
          for label, t in times.items()}}
print(json.dumps({{"tokens_per_s": out, "paired_ratio": paired, "agree": agree, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

SWEEP_SNIPPET = """
import json, time, torch
import helpers
from helpers import plateaus
helpers.setup(0, quiet=True)
model = helpers.load_model(verbose=False)
prompt = "The capital of France is the city of"
dirs = torch.nn.functional.normalize(torch.randn(8, model.cfg.d_model, generator=torch.Generator().manual_seed(0)), dim=-1)
steps = torch.linspace(0, 40, 12)
def timed(**kw):
    t0 = time.perf_counter(); out = plateaus.perturbation_curve(model, prompt, 6, dirs, steps, **kw)
    return time.perf_counter() - t0, out["kl"]
timed(batch_size=4)  # warm up
loop_s, kl_loop = timed(batch_size=1, method="full")  # one forward pass of the whole prompt per point
batched_s, kl_batched = timed()  # every point in one batch, the prompt's prefix shared by a key/value cache
print(json.dumps({{"points": int(dirs.shape[0] * steps.shape[0]), "loop_s": loop_s, "batched_s": batched_s,
                  "max_kl_difference": float((kl_loop - kl_batched).abs().max())}}))
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
    parser.add_argument("--repeats", type=int, default=11)
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
    print(f"\n| forward pass, {args.batch} x {args.seq} tokens unless named, median of {args.repeats} rounds | tokens/s "
          "| time / raw (median of the rounds' ratios) |\n|---|---|---|")
    for label, value in tp["tokens_per_s"].items():
        print(f"| {label} | {value:,.0f} | {tp['paired_ratio'][label]:.2f}x |")
    print(f"| peak memory, throughput process (two HF models + two bridges) | {tp['peak_mb']:.0f} MB | |")
    agree = tp["agree"]
    print(f"\nlogits, max |difference| over the batch (largest |logit| {agree['logit_scale']:.1f}): fast paths vs "
          f"TransformerLens's own {agree['max_abs_fast_vs_own']:.1e}; raw HF (SDPA) vs TransformerLens's own "
          f"{agree['max_abs_raw_vs_own']:.1e}")
    sweep = run_python(SWEEP_SNIPPET.format())
    report["batched_sweep"] = sweep
    print(f"\n| perturbation sweep, {sweep['points']} points (plateaus.perturbation_curve) | seconds |\n|---|---|")
    print(f"| one forward pass per point | {sweep['loop_s']:.1f} |")
    print(f"| batched, prefix shared by a key/value cache | {sweep['batched_s']:.1f} |")
    print(f"| speed-up | {sweep['loop_s'] / sweep['batched_s']:.1f}x (max KL difference {sweep['max_kl_difference']:.1e}) |")

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
