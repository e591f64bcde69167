"""Notebook 10's experiment code: true/false statement datasets and calibration questions built from the facts in
data/, group-wise splits, last-token states, mass-mean truth probes, steering each prompt's own tokens with its own
vector, and the search for entropy neurons (Stolfo et al. 2024) with exact last-layer ablations.

    data = truth.build_statements(helpers.DATA)                      # cities, neg_cities, translations, larger_than
    test = truth.group_split(units, test_frac=0.3, seed=0)           # no unit on both sides
    frac = truth.null_space_fraction(W_out, W_U, k=20)               # share of each neuron's norm W_U barely reads

Experiments layer (imports infrastructure only).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from helpers import interventions as I

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
TENS = {5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}


def number_word(n: int) -> str:
    """51 -> 'fifty-one' (51..99 only, the range Marks & Tegmark's larger_than uses)."""
    if not 51 <= n <= 99:
        raise ValueError(f"only 51..99 are spelled, got {n}")
    return TENS[n // 10] + ("-" + NUMBER_WORDS[n % 10] if n % 10 else "")


def _statement(text: str, label: int, unit: str) -> dict:
    return {"statement": text, "label": int(label), "unit": unit}


def _with_false(pairs: dict[str, str], make, rng: np.random.Generator) -> list[dict]:
    """One true and one false statement per key (the false object drawn from the other keys' objects)."""
    objects = sorted(set(pairs.values()))
    out = []
    for key in sorted(pairs):
        wrong = rng.choice([o for o in objects if o != pairs[key]])
        out += [_statement(make(key, pairs[key]), 1, key), _statement(make(key, wrong), 0, key)]
    return out


def build_statements(data_dir: Path, seed: int = 0, n_larger: int = 100) -> dict[str, list[dict]]:
    """Geometry-of-Truth-style datasets (Marks & Tegmark 2023), balanced, each row {statement, label, unit}:
    cities and neg_cities (from relations.json and function_vector_tasks.json), sp_en_trans (Spanish -> English,
    from function_vector_tasks.json and word_pairs.json) and larger_than (number words 51..99)."""
    rng = np.random.default_rng(seed)
    rel = json.loads((Path(data_dir) / "relations.json").read_text())["relations"]
    fv = json.loads((Path(data_dir) / "function_vector_tasks.json").read_text())["tasks"]
    wp = json.loads((Path(data_dir) / "word_pairs.json").read_text())["concepts"]
    city = {c: k for c, k in rel["city → country"]["samples"]}
    for country, capital in fv["country_capital"]["pairs"] + rel["country → capital"]["samples"]:
        if not country.startswith("the ") and capital not in city:
            city[capital] = country
    cities = _with_false(city, lambda c, k: f"The city of {c} is in {k}.", rng)
    neg = [_statement(s["statement"].replace(" is in ", " is not in "), 1 - s["label"], s["unit"]) for s in cities]
    es = {}
    for en, sp in fv["english_spanish"]["pairs"] + wp["English→Spanish"]["pairs"]:
        es.setdefault(sp, en)
    trans = _with_false(es, lambda s, e: f"The Spanish word '{s}' means '{e}'.", rng)
    larger = []
    pairs = [(a, b) for a in range(51, 100) for b in range(a + 1, 100)]
    for j, i in enumerate(rng.choice(len(pairs), size=n_larger, replace=False)):
        a, b = sorted(pairs[i], reverse=j % 2 == 0)                  # alternate true / false: balanced
        larger.append(_statement(f"{number_word(a).capitalize()} is larger than {number_word(b)}.", a > b, str(a)))
    return {"cities": cities, "neg_cities": neg, "sp_en_trans": trans, "larger_than": larger}


def build_questions(data_dir: Path, n_demos: int = 2) -> list[dict]:
    """Questions with one known answer for calibration, each {prompt, question, answer, subject, task}: the relations
    of relations.json (zero-shot), six tasks of function_vector_tasks.json (each after `n_demos` worked examples
    whose pairs are left out of the questions) and pause_tasks' arithmetic (after its worked examples). `question`
    is the last line of `prompt` (what a self-evaluation prompt repeats)."""
    d = Path(data_dir)
    rel = json.loads((d / "relations.json").read_text())["relations"]
    fv = json.loads((d / "function_vector_tasks.json").read_text())["tasks"]
    pause = json.loads((d / "pause_tasks.json").read_text())
    out = []
    for name, r in rel.items():
        out += [{"prompt": r["template"].format(s), "answer": " " + o, "subject": s, "task": name} for s, o in r["samples"]]
    templates = {"country_language": "The main language spoken in {} is", "present_past": "The past tense of {} is",
                 "singular_plural": "The plural of {} is", "english_french": 'The French word for "{}" is "',
                 "english_spanish": 'The Spanish word for "{}" is "', "country_capital": "The capital city of {} is"}
    for task, tpl in templates.items():
        quote = tpl.endswith('"')
        pairs = fv[task]["pairs"]
        demos = "".join(tpl.format(x) + (y + '".' if quote else " " + y + ".") + "\n" for x, y in pairs[:n_demos])
        out += [{"prompt": demos + tpl.format(x), "answer": y if quote else " " + y, "subject": x, "task": task}
                for x, y in pairs[n_demos:]]
    a = pause["arithmetic"]
    out += [{"prompt": a["prefix"] + it["question"] + a["cue"].rstrip(), "answer": " " + it["answer"].strip(),
             "subject": it["question"], "task": "arithmetic"} for it in a["items"]]
    for q in out:
        q["question"] = q["prompt"].split("\n")[-1]
    return out


def group_split(units: Sequence, test_frac: float = 0.3, seed: int = 0) -> np.ndarray:
    """Boolean test mask: a random `test_frac` of the distinct units, so no unit is on both sides."""
    units = np.asarray([str(u) for u in units])
    uniq = np.random.default_rng(seed).permutation(np.unique(units))
    if not 0 < test_frac < 1 or len(uniq) < 2:
        raise ValueError("need 0 < test_frac < 1 and at least two distinct units")
    n_test = min(len(uniq) - 1, max(1, round(test_frac * len(uniq))))
    return np.isin(units, uniq[:n_test])


def answer_token(model, prompt: str, answer: str) -> int:
    """The first token the answer adds after the prompt (tokenising prompt + answer together)."""
    p = model.to_tokens(prompt, prepend_bos=False)[0]
    full = model.to_tokens(prompt + answer, prepend_bos=False)[0]
    if len(full) <= len(p) or not torch.equal(full[:len(p)], p):
        return int(model.to_tokens(answer, prepend_bos=False)[0, 0])
    return int(full[len(p)])


@torch.no_grad()
def last_token_states(model, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 32
                      ) -> tuple[Tensor, Tensor]:
    """Residual stream at `layers` and the log-probabilities, both at each prompt's last token, in one pass:
    ([n_layers_sel, n, d_model], [n, vocab])."""
    names = [I.resid_name(model, L) for L in layers]
    states, logps = [], []
    for i in range(0, len(prompts), batch_size):
        logits, cache = I.run_with_cache(model, list(prompts[i:i + batch_size]), names)   # left-padded: -1 = last
        states.append(torch.stack([cache[n][:, -1] for n in names]))
        logps.append(logits[:, -1].float().log_softmax(-1))
    return torch.cat(states, 1), torch.cat(logps)


def _numpy(x) -> np.ndarray:
    """An array of x; a tensor is detached and brought to the CPU first (a CUDA tensor has no numpy view)."""
    return np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x)


class MassMean:
    """Mass-mean probe (Marks & Tegmark 2023): direction = mean(true) - mean(false); score = direction · (x - midpoint)
    (no covariance correction); predicts true when the score is positive."""

    def __init__(self, X: Tensor | np.ndarray, y: Sequence[int]):
        X, y = torch.as_tensor(_numpy(X), dtype=torch.float64), np.asarray(y).astype(int)
        if X.ndim != 2 or len(X) != len(y) or set(np.unique(y)) != {0, 1}:
            raise ValueError("need X [n, d] and labels holding both 0 and 1")
        mask = torch.as_tensor(y == 1)
        self.mu_true, self.mu_false = X[mask].mean(0), X[~mask].mean(0)
        self.direction = self.mu_true - self.mu_false
        self.midpoint = (self.mu_true + self.mu_false) / 2

    def score(self, X) -> np.ndarray:
        return ((torch.as_tensor(_numpy(X), dtype=torch.float64) - self.midpoint) @ self.direction).numpy()

    def accuracy(self, X, y: Sequence[int]) -> float:
        return float(((self.score(X) > 0).astype(int) == np.asarray(y).astype(int)).mean())


def statement_spans(model, prompts: Sequence[str], statements: Sequence[str]) -> list[tuple[int, int]]:
    """For each prompt that starts with its statement: (first, last + 1) positions of the statement's tokens,
    counted inside the prompt (0 = BOS)."""
    spans = []
    for p, s in zip(prompts, statements):
        if not p.startswith(s):
            raise ValueError(f"prompt does not start with its statement: {p!r}")
        n = model.to_tokens(s, prepend_bos=False).shape[1]
        spans.append((1, 1 + n))
    return spans


@torch.no_grad()
def steered_last_logits(model, prompts: Sequence[str], vectors: Tensor, layer: int,
                        spans: Sequence[tuple[int, int]], batch_size: int = 32) -> Tensor:
    """Last-token logits when row i gets vectors[i] added to the residual stream entering block `layer` at its
    positions spans[i] (counted inside the prompt; 0 = BOS): [n, vocab]."""
    if vectors.shape != (len(prompts), model.cfg.d_model) or len(spans) != len(prompts):
        raise ValueError("need one vector [d_model] and one span per prompt")
    if not torch.isfinite(vectors).all():
        raise ValueError("steering vectors must be finite")
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens = I.to_tokens(model, list(prompts[i:i + batch_size]))
        mask = I.attention_mask(model, tokens)
        start = mask.float().argmax(1)                               # column of each row's BOS (left padding)
        cols = torch.arange(tokens.shape[1], device=start.device)[None]
        lo = torch.tensor([s[0] for s in spans[i:i + batch_size]], device=start.device) + start
        hi = torch.tensor([s[1] for s in spans[i:i + batch_size]], device=start.device) + start
        where = ((cols >= lo[:, None]) & (cols < hi[:, None])).float()
        v = vectors[i:i + batch_size]

        def hook(resid, hook=None, where=where, v=v):
            return resid + where[..., None].to(resid.dtype) * v[:, None, :].to(resid.dtype)

        with model.hooks(fwd_hooks=[(I.resid_name(model, layer), hook)]):
            out.append(model(tokens, attention_mask=mask)[:, -1].float().clone())   # clone: free the full logits
    return torch.cat(out)


def null_space_fraction(W_out: Tensor, W_U: Tensor, k: int) -> Tensor:
    """Share of each row's squared norm (W_out [n, d_model]) in the span of the k left singular vectors of
    W_U [d_model, vocab] with the smallest singular values: the directions the unembedding barely reads."""
    if W_out.ndim != 2 or W_U.ndim != 2 or W_out.shape[1] != W_U.shape[0] or not 0 < k < W_U.shape[0]:
        raise ValueError(f"need W_out [n, d], W_U [d, vocab] and 0 < k < d; got {tuple(W_out.shape)}, "
                         f"{tuple(W_U.shape)}, k={k}")
    U = torch.linalg.svd(W_U.double(), full_matrices=False).U[:, -k:]   # singular values sorted descending
    W = W_out.double()
    return ((W @ U) ** 2).sum(1) / (W ** 2).sum(1).clamp_min(1e-30)


def entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) over the last dimension."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def ablation_entropy_change(model, resid: Tensor, acts: Tensor, neurons: Sequence[int], W_out: Tensor,
                            chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean-ablation of last-layer MLP neurons from cached tensors: resid [n_tok, d] is the stream after the
    last block, acts [n_tok, d_mlp] the last MLP's post-activations. Returns per neuron the mean absolute change of
    output entropy (nats) over tokens, total (through the final norm) and direct (the norm's scale frozen at its
    clean value), each [len(neurons)]. Assumes an RMS final norm whose weight is folded into the unembedding, so
    norm(x) = g(x) x with a scalar g(x); the rank-one change c * W_out[i] then moves the logits by c * (W_out[i] @ W_U)."""
    if resid.ndim != 2 or acts.ndim != 2 or resid.shape[0] != acts.shape[0]:
        raise ValueError("need resid [n_tok, d] and acts [n_tok, d_mlp] for the same tokens")
    W_U = model.W_U.detach()
    b_U = getattr(model, "b_U", None)
    b_U = torch.zeros(W_U.shape[1], device=W_U.device) if b_U is None else b_U.detach()
    means = acts.mean(0)
    gain = lambda x: model.ln_final(x[:, None])[:, 0].norm(dim=-1) / x.norm(dim=-1)   # g(x) per token
    total, direct = np.zeros(len(neurons)), np.zeros(len(neurons))
    for s in range(0, resid.shape[0], chunk):
        x = resid[s:s + chunk]
        raw, g0 = x @ W_U, gain(x)[:, None]
        h0 = entropy(g0 * raw + b_U)
        for j, i in enumerate(neurons):
            c = (means[i] - acts[s:s + chunk, i])[:, None]                             # [tok, 1]
            moved = raw + c * (W_out[i] @ W_U)[None]
            g1 = gain(x + c * W_out[i][None])[:, None]
            total[j] += float((entropy(g1 * moved + b_U) - h0).abs().sum())
            direct[j] += float((entropy(g0 * moved + b_U) - h0).abs().sum())
    return total / resid.shape[0], direct / resid.shape[0]


def larger_than_numbers(statement: str) -> tuple[int, int]:
    """'Eighty-four is larger than ninety-five.' -> (84, 95): the two numbers of a larger_than statement."""
    words = {number_word(n): n for n in range(51, 100)}
    a, b = statement.rstrip(".").split(" is larger than ")
    return words[a.lower()], words[b]


def subsample_by_unit(rows: Sequence[dict], n: int | None, seed: int = 0) -> set[str]:
    """A random set of units whose rows number about `n` (whole units kept together; None: every unit)."""
    units = sorted({r["unit"] for r in rows})
    if n is None or n >= len(rows):
        return set(units)
    per_unit = len(rows) / len(units)
    return set(np.random.default_rng(seed).permutation(units)[:max(2, round(n / per_unit))].tolist())


def probe_sweep(states: Tensor, dataset: np.ndarray, labels: np.ndarray, units: np.ndarray, layers: Sequence[int],
                seeds: Sequence[int], train_on: Sequence[str], test_frac: float = 0.3, shuffle: bool = False,
                keep_predictions_at: int | None = None):
    """Logistic (C chosen on a quarter of the training units) and mass-mean probes trained per layer on each
    dataset of `train_on` and tested on every dataset's rows whose unit was not trained on (held-out units of the
    same dataset; for the others, every row not sharing a training unit). states: [len(layers), n, d], one slice
    per entry of `layers` (pass S[[i]] for a single layer, not all of S). shuffle=True permutes the training labels
    (a control). The table also holds, as test "<dataset> (validation)", the mass-mean probe refitted without a
    quarter of the training units and scored on them: a layer can be chosen there without touching the test units.
    Returns (accuracy table, per-statement correctness on test units at layer `keep_predictions_at`: rows seed,
    train, test, probe, index, correct)."""
    import pandas as pd

    from helpers import probes

    if states.ndim != 3 or states.shape[0] != len(layers) or states.shape[1] != len(dataset):
        raise ValueError(f"states must be [len(layers)={len(layers)}, n={len(dataset)}, d], got {tuple(states.shape)}")
    if keep_predictions_at is not None and keep_predictions_at not in layers:
        raise ValueError(f"keep_predictions_at={keep_predictions_at} is not one of the layers {list(layers)}")
    rows, preds = [], []
    for seed in seeds:
        for src in train_on:
            src_rows = np.flatnonzero(dataset == src)
            truth_split = group_split(units[src_rows], test_frac, seed)
            train_idx = src_rows[~truth_split]
            val = group_split(units[train_idx], 0.25, seed + 1000)
            y = labels.copy()
            if shuffle:
                y[train_idx] = np.random.default_rng(seed).permutation(y[train_idx])
            train_units = set(units[train_idx])
            targets = {t: np.flatnonzero((dataset == t) & ~np.isin(units, list(train_units))) for t in np.unique(dataset)}
            for li, L in enumerate(layers):
                X = states[li].double().cpu().numpy()
                lr = probes.logistic_probe(X[train_idx[~val]], y[train_idx[~val]], X[train_idx[val]], y[train_idx[val]],
                                           seed=seed)
                mm = MassMean(X[train_idx], y[train_idx])
                mm_val = MassMean(X[train_idx[~val]], y[train_idx[~val]])
                v_ok = (mm_val.score(X[train_idx[val]]) > 0).astype(int) == y[train_idx[val]]
                rows.append({"seed": seed, "train": src, "test": f"{src} (validation)", "layer": L, "probe": "mass-mean",
                             "accuracy": float(v_ok.mean()), "n": int(val.sum())})
                for t, idx in targets.items():
                    for name, pred in (("logistic", lr.predict(X[idx])), ("mass-mean", (mm.score(X[idx]) > 0).astype(int))):
                        ok = pred == labels[idx]
                        rows.append({"seed": seed, "train": src, "test": t, "layer": L, "probe": name,
                                     "accuracy": float(ok.mean()), "n": len(idx)})
                        if L == keep_predictions_at:
                            preds += [{"seed": seed, "train": src, "test": t, "probe": name, "index": int(i),
                                       "correct": int(c)} for i, c in zip(idx, ok)]
    return pd.DataFrame(rows), pd.DataFrame(preds)


@torch.no_grad()
def final_states(model, texts: Sequence[str], n_tokens: int, batch_size: int = 4) -> tuple[Tensor, Tensor]:
    """The residual stream after the last block and the last MLP's post-activations at the first `n_tokens` real
    tokens after BOS of `texts` (read in batches until there are enough): ([n, d_model], [n, d_mlp])."""
    n_layers = model.cfg.n_layers
    names = [I.resid_name(model, n_layers), I.hook_name(model, "mlp_post", n_layers - 1)]
    resid, post, n = [], [], 0
    for i in range(0, len(texts), batch_size):
        tokens = I.to_tokens(model, list(texts[i:i + batch_size]))
        _, cache = I.run_with_cache(model, tokens, names)
        mask = I.position_mask(I.attention_mask(model, tokens), I.AFTER_BOS).bool()
        resid.append(cache[names[0]][mask]); post.append(cache[names[1]][mask])
        n += int(mask.sum())
        if n >= n_tokens:
            break
    if n < n_tokens:
        raise ValueError(f"the texts hold only {n} tokens after BOS, fewer than {n_tokens}")
    return torch.cat(resid)[:n_tokens], torch.cat(post)[:n_tokens]
