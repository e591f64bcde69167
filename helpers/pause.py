"""Pause (filler) tokens: build prompts with k fillers, score them with confidence intervals, measure what
pause positions hold, and train a tiny transformer on a synthetic 3SUM task with and without fillers.

    from helpers import pause
    tasks = pause.load_tasks()                                   # data/pause_tasks.json
    fill = pause.filler_ids(model.tokenizer, "dots", 8)          # eight " ." tokens
    batch = pause.build_batch(model.tokenizer, tasks["arithmetic"], fill)
    scores = pause.score_pauses(hf_model, tok, tasks["facts"], {"dots": fill}, ks=[0, 4, 8])
    cfg = pause.ThreeSumConfig(n_min=4, n_max=4, dim=6, mod=2, steps=800)
    net, losses = pause.train_three_sum(cfg, "filler + supervision")   # also "no filler", "filler", ...
    pause.three_sum_accuracy(net, cfg, "filler + supervision", n=4)   # held-out accuracy, Wilson interval
    pause.three_sum_filler_patch(net, cfg, "filler + supervision", n=4)  # is the answer read off the fillers?
    cfg = pause.ThreeSumConfig(n_min=3, n_max=5, dim=2, mod=5, square_fillers=True)   # Pfau et al.'s match-3:
    net, losses = pause.train_three_sum(cfg, "filler + CoT mix")        # n_max**2 fillers, 50/50 CoT strings

References: Goyal et al. 2023, "Think before you speak: training language models with pause tokens"
(arXiv 2310.02226); Pfau, Merrill & Bowman 2024, "Let's think dot by dot" (arXiv 2404.15758).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.env import DATA, torch_threads
from helpers.geometry import effective_rank
from helpers.stats import bootstrap_ci, bootstrap_ratio_ci, paired_difference, wilson_interval  # noqa: F401  (moved to stats)

FILLER_KINDS = ("dots", "newlines", "special", "meaningful", "neutral")
# Task-irrelevant but meaningful text: the "same length, real tokens" control for pauses.
NEUTRAL_TEXT = (" The weather was mild and the streets were quiet that morning, so we walked slowly along"
                " the river before breakfast and talked about the garden, the neighbours and the old bridge.")
# Task-neutral real words (no content of their own, no distractor): the same-length control for pauses
# that keeps the prompt on task. Repeated to length k.
NEUTRAL_PAD = " Let me think about this before I answer."
TASKS_FILE = "pause_tasks.json"
PLACEMENTS = ("mid", "end")


# ---------------------------------------------------------------------------------------------
# task sets
def load_tasks(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The task families of data/pause_tasks.json: {family: {"prefix", "alt_prefix", "cue", "items":
    [{question, answer}]}}. `alt_prefix`: other worked examples of the same token length (a control)."""
    path = Path(path) if path is not None else DATA / TASKS_FILE
    tasks = json.loads(path.read_text())
    for name, fam in tasks.items():
        missing = {"prefix", "cue", "items"} - set(fam)
        if missing:
            raise ValueError(f"task family {name!r} in {path} lacks {sorted(missing)}")
        for item in fam["items"]:
            if not {"question", "answer"} <= set(item):
                raise ValueError(f"an item of {name!r} lacks 'question' or 'answer': {item}")
    return tasks


def subsample(family: dict[str, Any], n: int | None, seed: int = 0) -> dict[str, Any]:
    """The same family with at most `n` items, drawn without replacement with a fixed seed (None: all)."""
    items = family["items"]
    if n is None or n >= len(items):
        return dict(family)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    keep = sorted(np.random.default_rng(seed).choice(len(items), size=n, replace=False).tolist())
    return {**family, "items": [items[i] for i in keep]}


def make_task_file(path: str | Path | None = None, seed: int = 0) -> Path:
    """Write data/pause_tasks.json: arithmetic (every single-digit sum and difference), one-hop facts
    (capitals, written by hand) and list lookups (prices of four items, generated with `seed`)."""
    rng = np.random.default_rng(seed)
    demos_ar = {("2", "+", "5"), ("8", "-", "3")}
    arithmetic = [dict(question=f"{a} {op} {b}", answer=str(a + b if op == "+" else a - b))
                  for op in "+-" for a in range(1, 10) for b in range(1, 10)
                  if (op == "+" and a + b <= 9) or (op == "-" and b < a) if (str(a), op, str(b)) not in demos_ar]
    capitals = [("France", "Paris"), ("Japan", "Tokyo"), ("Spain", "Madrid"), ("Russia", "Moscow"),
                ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("China", "Beijing"), ("Greece", "Athens"),
                ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Austria", "Vienna"),
                ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("Ireland", "Dublin"),
                ("Australia", "Canberra"), ("Switzerland", "Bern"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"),
                ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Iran", "Tehran"),
                ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
                ("Bulgaria", "Sofia"), ("the Philippines", "Manila"), ("South Korea", "Seoul"),
                ("Afghanistan", "Kabul"), ("Jamaica", "Kingston"), ("Tunisia", "Tunis"), ("Scotland", "Edinburgh"),
                ("Wales", "Cardiff"), ("England", "London")]
    facts = [dict(question=f"The capital of {c}", answer=" " + a) for c, a in capitals]
    words = ("cat dog sun car pen cup hat box king road milk fish door moon shoe bell tree bird ship coin "
             "lamp rose book key").split()
    lists = []
    for _ in range(60):
        chosen = rng.choice(len(words), size=4, replace=False)
        prices = rng.choice(np.arange(1, 10), size=4, replace=False)
        ask = int(rng.integers(4))
        listing = ", ".join(f"{words[w]} {p}" for w, p in zip(chosen, prices))
        lists.append(dict(question=f"Prices: {listing}. The {words[chosen[ask]]}", answer=str(prices[ask])))
    tasks = {
        "arithmetic": dict(prefix="2 + 5 = 7\n8 - 3 = 5\n", alt_prefix="4 + 4 = 8\n9 - 6 = 3\n", cue=" = ",
                           items=arithmetic, note="single-digit sums and differences, two worked examples"),
        "facts": dict(prefix="The capital of Italy is Rome.\nThe capital of Germany is Berlin.\n",
                      alt_prefix="The capital of India is Delhi.\nThe capital of Italy is Rome.\n", cue=" is",
                      items=facts, note="one-hop facts: capitals, two worked examples"),
        "lists": dict(prefix="Prices: lamp 4, rose 8, cup 1, hat 6. The cup costs 1.\n",
                      alt_prefix="Prices: milk 3, king 9, ship 2, pen 5. The ship costs 2.\n", cue=" costs ",
                      items=lists, note="look up one item's price in a list of four, one worked example"),
    }
    path = Path(path) if path is not None else DATA / TASKS_FILE
    path.write_text(json.dumps(tasks, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# fillers
def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def unused_special_token(tokenizer, embeddings: Tensor) -> int:
    """An added special token the model never learned: among the tokenizer's added special tokens (not BOS,
    EOS, pad or unk), the one with the most near-identical embeddings among the others (an untouched
    initialisation); if none are duplicates, the one with the smallest embedding norm."""
    skip = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    candidates = sorted(i for i, tok in added.items() if getattr(tok, "special", True) and i not in skip
                        and i < embeddings.shape[0])
    if not candidates:
        raise ValueError("this tokenizer has no spare special token; use the 'dots' or 'newlines' fillers")
    emb = embeddings[candidates].detach().float()
    dist = torch.cdist(emb, emb)
    near = (dist < 0.02 * emb.norm(dim=-1).mean()).sum(-1) - 1        # near-duplicates, not counting itself
    if near.max() > 0:
        return candidates[int(near.argmax())]
    return candidates[int(emb.norm(dim=-1).argmin())]


def filler_ids(tokenizer, kind: str, k: int, special_id: int | None = None,
               neutral_text: str = NEUTRAL_TEXT) -> list[int]:
    """k filler token ids of one kind: "dots" (the token ' .'), "newlines" (k newline tokens), "special"
    (`special_id`, e.g. from `unused_special_token`), "meaningful" (the first k tokens of an irrelevant
    sentence: a distractor with real words) or "neutral" (the first k tokens of `NEUTRAL_PAD` repeated:
    real words with no task content, the task-neutral same-length control)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if kind not in FILLER_KINDS:
        raise ValueError(f"unknown filler kind {kind!r}; choose from {FILLER_KINDS}")
    if kind == "dots":
        ids = _ids(tokenizer, " .")
        ids = ids if len(ids) == 1 else _ids(tokenizer, ".")
        return ids[:1] * k
    if kind == "newlines":
        return _ids(tokenizer, "\n")[:1] * k
    if kind == "special":
        if special_id is None:
            raise ValueError("kind='special' needs special_id (see unused_special_token)")
        return [int(special_id)] * k
    text_ids = _ids(tokenizer, NEUTRAL_PAD if kind == "neutral" else neutral_text)
    while len(text_ids) < k:
        text_ids = text_ids + text_ids
    return text_ids[:k]


def insert_fillers(question_ids: Sequence[int], cue_ids: Sequence[int], fillers: Sequence[int]) -> list[int]:
    """question + fillers + cue (with no fillers: exactly question + cue)."""
    return list(question_ids) + list(fillers) + list(cue_ids)


@dataclass
class PromptBatch:
    """Left-padded prompts that share one suffix (fillers + cue), so every pause and cue position is the
    same column in every row. `question[i]`: row i's question columns (its few-shot prefix excluded)."""

    tokens: Tensor                     # [batch, pos]
    answer_ids: Tensor                 # [batch]
    pause: list[int]                   # columns of the fillers
    cue: list[int]                     # columns of the answer cue; the last is where the answer is read
    question: list[list[int]] = field(default_factory=list)
    n_pad: Tensor | None = None        # left padding of each row

    @property
    def answer_pos(self) -> int:
        return self.tokens.shape[1] - 1


def answer_token(tokenizer, answer: str) -> int:
    """The first token of `answer` (tasks are written so that it is the whole answer)."""
    ids = _ids(tokenizer, answer)
    if not ids:
        raise ValueError(f"empty answer {answer!r}")
    return ids[0]


def build_batch(tokenizer, family: dict[str, Any], fillers: Sequence[int], bos: bool = True) -> PromptBatch:
    """Tokens of prefix + question + fillers + cue for every item of a task family, left-padded."""
    cue = _ids(tokenizer, family["cue"])
    prefix = _ids(tokenizer, family["prefix"])
    start = [tokenizer.bos_token_id] if bos else []
    rows, questions = [], []
    for item in family["items"]:
        full = _ids(tokenizer, family["prefix"] + item["question"])
        if full[:len(prefix)] != prefix:
            raise ValueError(f"the prefix and the question {item['question']!r} merge across their boundary")
        rows.append(start + insert_fillers(full, cue, fillers))
        questions.append(len(full) - len(prefix))
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r)
    n_pad = torch.tensor([width - len(r) for r in rows])
    k, c = len(fillers), len(cue)
    pause = list(range(width - c - k, width - c))
    question = [list(range(width - c - k - q, width - c - k)) for q in questions]
    answers = torch.tensor([answer_token(tokenizer, it["answer"]) for it in family["items"]])
    return PromptBatch(tokens=tokens, answer_ids=answers, pause=pause, cue=list(range(width - c, width)),
                       question=question, n_pad=n_pad)


def equal_length_subset(tokenizer, family: dict[str, Any], prefix: str | None = None) -> dict[str, Any]:
    """The items whose prefix + question has the most common token length, so that every position
    (question, pauses, cue) is the same column in a batch: what patching needs."""
    prefix = family["prefix"] if prefix is None else prefix
    lengths = [len(_ids(tokenizer, prefix + it["question"])) for it in family["items"]]
    common = max(set(lengths), key=lengths.count)
    return {**family, "items": [it for it, n in zip(family["items"], lengths) if n == common]}


def paired_sources(answers: Sequence[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(source, third): for each item i, a source item with a different answer, and a third item whose
    answer differs from both (the shuffled-label control). Raises if the answers allow no such choice."""
    answers = np.asarray(answers)
    n = len(answers)
    if len(set(answers.tolist())) < 3:
        raise ValueError("need at least three distinct answers to pair items")
    rng = np.random.default_rng(seed)
    source, third = np.empty(n, dtype=int), np.empty(n, dtype=int)
    for i in range(n):
        source[i] = rng.choice(np.flatnonzero(answers != answers[i]))
        third[i] = rng.choice(np.flatnonzero((answers != answers[i]) & (answers != answers[source[i]])))
    return source, third


# ---------------------------------------------------------------------------------------------
# scoring, with a shared prefix computed once
@torch.no_grad()
def score_pauses(hf_model, tokenizer, family: dict[str, Any], runs: dict[str, Sequence[int]], ks: Sequence[int],
                 batch_size: int = 64, threads: int | None = 1, placement: str = "mid"
                 ) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Answer log-prob and correctness of every item of `family` with the first k tokens of each filler
    run in `runs` ({kind: ids}) between question and cue, for each k in `ks` (a Hugging Face causal LM).

    The prefix + question is run once per batch and cached; each run of fillers is then run once, and
    for each k the cache is cut back to k fillers before the cue is read (a causal model's state after k
    fillers does not depend on later ones). Returns {(kind, k): {"logprob": [n], "correct": [n]}}; the
    numbers equal those of the full prompts (tests/test_pause.py checks this). threads: torch CPU threads
    for these many small forward passes (see `torch_threads`; None: the current setting).

    placement="end" (Goyal et al.'s placement): the fillers come after the cue, right before the answer,
    which is read at the last filler (prefix + question + cue + k fillers; k = 0 reads it at the cue)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose from {PLACEMENTS}")
    with torch_threads(threads):
        return _score_pauses(hf_model, tokenizer, family, runs, ks, batch_size, placement)


def _score_pauses(hf_model, tokenizer, family, runs, ks, batch_size, placement="mid"):
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 0:
        raise ValueError(f"ks must be non-negative ints, got {ks}")
    for kind, ids in runs.items():
        if len(ids) < ks[-1]:
            raise ValueError(f"run {kind!r} has {len(ids)} tokens, fewer than k = {ks[-1]}")
    cue = _ids(tokenizer, family["cue"])
    answers = torch.tensor([answer_token(tokenizer, it["answer"]) for it in family["items"]])
    end = placement == "end"
    prefixes = [[tokenizer.bos_token_id] + _ids(tokenizer, family["prefix"] + it["question"]) + (cue if end else [])
                for it in family["items"]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(hf_model.parameters()).device
    out = {(kind, k): {"logprob": [], "correct": []} for kind in runs for k in ks}

    def step(ids: Tensor, mask: Tensor, first_pos: Tensor, cache, keep: int = 1):
        pos = first_pos[:, None] + torch.arange(ids.shape[1], device=device)
        return hf_model(input_ids=ids, attention_mask=torch.cat([mask, torch.ones_like(ids)], 1), position_ids=pos,
                        past_key_values=cache, use_cache=True, logits_to_keep=keep)

    for start in range(0, len(prefixes), batch_size):
        chunk = prefixes[start:start + batch_size]
        n, width = len(chunk), max(len(p) for p in chunk)
        tokens = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(chunk):
            tokens[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        position = (mask.cumsum(-1) - 1).clamp_min(0)
        tokens, mask, position = tokens.to(device), mask.to(device), position.to(device)
        first = hf_model(input_ids=tokens, attention_mask=mask, position_ids=position, use_cache=True,
                         logits_to_keep=1)
        cache = first.past_key_values
        nxt = position[:, -1] + 1                       # position of the first token after the prefix
        ans = answers[start:start + n].to(device)
        cue_ids = torch.tensor(cue, dtype=torch.long, device=device).expand(n, -1)
        if end:                                          # read the answer at the cue, then at each filler
            for kind, ids in runs.items():
                logits = first.logits[:, -1:]
                if ks[-1] > 0:
                    fill = torch.tensor(list(ids[:ks[-1]]), dtype=torch.long, device=device).expand(n, -1)
                    more = step(fill, mask, nxt, cache, keep=0).logits
                    logits = torch.cat([logits, more], 1)
                    _crop(cache, width)
                for k in ks:
                    logp = logits[:, k].float().log_softmax(-1)
                    out[kind, k]["logprob"].append(logp.gather(1, ans[:, None])[:, 0].cpu().numpy())
                    out[kind, k]["correct"].append((logp.argmax(-1) == ans).cpu().numpy())
            continue
        for kind, ids in runs.items():
            if ks[-1] > 0:
                fill = torch.tensor(list(ids[:ks[-1]]), dtype=torch.long, device=device).expand(n, -1)
                step(fill, mask, nxt, cache)
            for k in reversed(ks):                       # longest first: each crop only removes positions
                _crop(cache, width + k)
                mask_k = torch.cat([mask, torch.ones((n, k), dtype=mask.dtype, device=device)], 1)
                logp = step(cue_ids, mask_k, nxt + k, cache).logits[:, -1].float().log_softmax(-1)
                out[kind, k]["logprob"].append(logp.gather(1, ans[:, None])[:, 0].cpu().numpy())
                out[kind, k]["correct"].append((logp.argmax(-1) == ans).cpu().numpy())
            _crop(cache, width)
    return {key: {name: np.concatenate(v) for name, v in d.items()} for key, d in out.items()}


def _crop(cache, length: int) -> None:
    """Drop everything after the first `length` positions of a Hugging Face cache (any version)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)       # a negative argument removes that many positions, old and new APIs alike


# ---------------------------------------------------------------------------------------------
# what pause positions hold
def attention_mass(pattern: Tensor, query: int | Sequence[int], keys: Sequence[int]) -> Tensor:
    """Attention paid by `query` position(s) to `keys`, summed over the keys and averaged over heads and
    queries: pattern [batch, head, q, k] -> [batch]."""
    if pattern.ndim != 4:
        raise ValueError(f"pattern must be [batch, head, query, key], got shape {tuple(pattern.shape)}")
    q = [query] if isinstance(query, int) else list(query)
    return pattern[:, :, q][..., list(keys)].sum(-1).mean(dim=(1, 2))


def consecutive_cosine(resid: Tensor, positions: Sequence[int]) -> Tensor:
    """Cosine similarity of the residual streams at consecutive `positions`: [..., pos, d] -> [..., len-1]."""
    positions = list(positions)
    if len(positions) < 2:
        raise ValueError("need at least two positions")
    x = resid[..., positions, :]
    return F.cosine_similarity(x[..., 1:, :], x[..., :-1, :], dim=-1)


@torch.no_grad()
def lens_answer_logprob(model, resid: Tensor, answer_ids: Tensor, candidates: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """Logit lens at many positions: resid [layer, batch, pos, d_model] -> (log p(answer), rank of the
    answer), each [layer, batch, pos]; rank 1 = top, among the whole vocabulary or, when `candidates`
    (token ids) is given, among those candidates only (e.g. the ten digits). One layer at a time."""
    from helpers.interventions import unembed

    if resid.ndim != 4 or resid.shape[1] != len(answer_ids):
        raise ValueError(f"resid must be [layer, batch, pos, d] with batch = {len(answer_ids)}, "
                         f"got {tuple(resid.shape)}")
    logps, ranks = [], []
    for layer_resid in resid:
        logp = unembed(model, layer_resid).float().log_softmax(-1)     # [batch, pos, vocab]
        target = logp.gather(-1, answer_ids.to(logp.device)[:, None, None].expand(-1, logp.shape[1], 1))
        pool = logp if candidates is None else logp[..., candidates.to(logp.device)]
        logps.append(target[..., 0].cpu())
        ranks.append(((pool > target).sum(-1) + 1).cpu())
    return torch.stack(logps), torch.stack(ranks)


# ---------------------------------------------------------------------------------------------
# rank measures
def rank_gain(rows: Tensor, n_base: int, ks: Sequence[int], measure=effective_rank) -> np.ndarray:
    """measure(first n_base + k rows) - measure(first n_base rows), for each k: how much rank k extra
    positions add to the set of vectors attention can read. rows: [..., pos, d] -> [len(ks), ...]."""
    if rows.ndim < 2:
        raise ValueError(f"rows must be [..., pos, d], got shape {tuple(rows.shape)}")
    if n_base < 1 or n_base + max(ks) > rows.shape[-2]:
        raise ValueError(f"n_base {n_base} + max k {max(ks)} exceeds the {rows.shape[-2]} rows")
    base = np.asarray(measure(rows[..., :n_base, :]))
    return np.stack([np.asarray(measure(rows[..., :n_base + k, :])) - base for k in ks])


# ---------------------------------------------------------------------------------------------
# the synthetic task: 3SUM over tuples (Pfau, Merrill & Bowman 2024)
CONDITIONS = ("no filler", "filler", "filler + supervision", "no filler + supervision", "filler + CoT mix")
# "no filler + supervision" is a control beyond Pfau et al.: the same intermediate targets as "filler +
# supervision" (every pair's match and complement), all read out at the answer position, with no extra positions.
SUPERVISED = ("filler + supervision", "no filler + supervision")
# "filler + CoT mix" follows Pfau et al.'s match-3 training (JacobPfau/fillerTokens, src/match3.py): a share
# `cot_rate` of the training strings carries a parallelisable chain of thought in the filler slots (slot p
# holds pair p's result, teacher-forced: its input is the previous slot's result, and it is trained to output
# its own pair's result); the other strings hold plain fillers and are trained on the answer only. Tested on
# filler strings only.
FILLER_CONDITIONS = ("filler", "filler + supervision", "filler + CoT mix")


def pair_index(n: int) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of n positions, in the order filler positions stand for them."""
    if n < 2:
        raise ValueError(f"need n >= 2, got {n}")
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def three_sum_batch(batch: int, n_min: int, n_max: int, dim: int = 3, mod: int = 10,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random 3SUM instances: `x` [batch, n_max, dim] tuples mod `mod`, `real` [batch, n_max] (the first n
    positions of each row are real, n uniform in [n_min, n_max]; the rest are blanks, all-zero).

    As in Pfau et al., every row gets a planted triple x_a + x_b + x_c = 0 (mod `mod`, coordinate-wise);
    in half the rows one coordinate of x_c is then shifted and the row is redrawn until it holds no
    triple at all, so the labels are balanced and the negatives are near misses. Labels come from
    `three_sum_labels`, which checks every triple."""
    if not 3 <= n_min <= n_max:
        raise ValueError(f"need 3 <= n_min <= n_max, got {n_min}, {n_max}")
    if mod < 2 or dim < 1:
        raise ValueError(f"need mod >= 2 and dim >= 1, got {mod}, {dim}")
    negative = torch.arange(batch) % 2 == 1                     # exactly half the rows are negatives
    x, real = _planted(batch, n_min, n_max, dim, mod, negative, generator)
    for _ in range(100):
        bad = negative & (three_sum_labels(x, real, mod)["label"] == 1)
        if not bad.any():
            break
        nb = int(bad.sum())
        x[bad], real[bad] = _planted(nb, n_min, n_max, dim, mod, torch.ones(nb, dtype=torch.bool), generator)
    else:
        raise RuntimeError("could not draw negatives without a triple: the tuple space is too small for n_max")
    return x, real


def _planted(batch: int, n_min: int, n_max: int, dim: int, mod: int, miss: Tensor,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Rows with a planted triple; where `miss`, one coordinate of its third member is shifted."""
    n = torch.randint(n_min, n_max + 1, (batch,), generator=generator)
    x = torch.randint(0, mod, (batch, n_max, dim), generator=generator)
    real = torch.arange(n_max)[None] < n[:, None]
    keys = torch.rand(batch, n_max, generator=generator) + 2.0 * (~real)
    idx = keys.argsort(1)[:, :3]                                        # three distinct real positions
    member = lambda j: x.gather(1, idx[:, j:j + 1, None].expand(batch, 1, dim))
    third = (-(member(0) + member(1))) % mod
    rows = torch.arange(batch)
    coord = torch.randint(0, dim, (batch,), generator=generator)
    shift = torch.randint(1, mod, (batch,), generator=generator)
    third[rows, 0, coord] = torch.where(miss, (third[rows, 0, coord] + shift) % mod, third[rows, 0, coord])
    x.scatter_(1, idx[:, 2:3, None].expand(batch, 1, dim), third)
    return x * real[..., None], real


def three_sum_labels(x: Tensor, real: Tensor, mod: int = 10) -> dict[str, Tensor]:
    """Exact labels by brute force. "label" [batch]: is there a triple of distinct real positions summing
    to 0 mod `mod` in every coordinate? "pair" [batch, n_pairs]: for pair (i, j), does some other real
    position k hold -(x_i + x_j)? (label = any(pair)). "complement" [batch, n_pairs, dim]: -(x_i + x_j)
    mod `mod`. "pair_real" [batch, n_pairs]: both members are real."""
    if x.ndim != 3 or real.shape != x.shape[:2]:
        raise ValueError(f"x must be [batch, n, dim] and real [batch, n]; got {tuple(x.shape)}, {tuple(real.shape)}")
    n = x.shape[1]
    pairs = pair_index(n)
    i = torch.tensor([p[0] for p in pairs], device=x.device)
    j = torch.tensor([p[1] for p in pairs], device=x.device)
    complement = (-(x[:, i] + x[:, j])) % mod
    equal = (complement[:, :, None, :] == x[:, None, :, :]).all(-1)              # [batch, pairs, k]
    k = torch.arange(n, device=x.device)
    other = (k[None] != i[:, None]) & (k[None] != j[:, None])
    pair_real = real[:, i] & real[:, j]
    pair = (equal & other[None] & real[:, None, :] & pair_real[..., None]).any(-1)
    return {"label": pair.any(-1).long(), "pair": pair.long(), "complement": complement, "pair_real": pair_real,
            "first": x[:, i], "second": x[:, j]}


def encode_three_sum(x: Tensor, real: Tensor, mod: int, n_fillers: int,
                     cot: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Input vectors [batch, n + n_fillers + 1, dim*mod + 4]: one-hot digits of each tuple, then flags
    (real tuple, blank, filler, answer). Vector inputs with a linear embedding, as in Pfau et al.

    cot = (rows [batch] bool, content [batch, n_cot, c]): the chain-of-thought slots of "filler + CoT mix".
    Then every vector gets c + 1 more features (a CoT flag, then the content), and in `rows` the first n_cot
    filler slots hold CoT tokens (CoT flag and content instead of the filler flag)."""
    batch, n, dim = x.shape
    extra = 0 if cot is None else cot[1].shape[-1] + 1
    base = dim * mod + 4
    feats = torch.zeros(batch, n + n_fillers + 1, base + extra, device=x.device)
    feats[:, :n, :dim * mod] = F.one_hot(x, mod).float().reshape(batch, n, dim * mod) * real[..., None]
    feats[:, :n, dim * mod] = real.float()
    feats[:, :n, dim * mod + 1] = (~real).float()
    feats[:, n:n + n_fillers, dim * mod + 2] = 1
    feats[:, -1, dim * mod + 3] = 1
    if cot is not None:
        rows, content = cot[0].to(x.device), cot[1].to(x.device).float()
        n_cot = content.shape[1]
        if n_cot > n_fillers:
            raise ValueError(f"{n_cot} CoT tokens do not fit in {n_fillers} filler slots")
        slots = feats[:, n:n + n_cot]
        slots[rows, :, dim * mod + 2] = 0
        slots[rows, :, base] = 1
        slots[rows, :, base + 1:] = content[rows]
    return feats


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        batch, pos, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(batch, pos, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = self.out(z.transpose(1, 2).reshape(batch, pos, d))
        h = h + attn
        return h + self.mlp(self.ln2(h)), attn


class TinyTransformer(nn.Module):
    """A small causal pre-norm transformer on vector inputs with learned positions (the shape of Pfau et
    al.'s 4-layer Llama, much narrower). forward(x) -> logits [batch, pos, d_out]."""

    def __init__(self, d_in: int, d_out: int, max_len: int, d_model: int = 64, n_layers: int = 3,
                 n_heads: int = 4, pos_scale: float = 0.1) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * pos_scale)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, d_out)

    def forward(self, x: Tensor, return_hidden: bool = False, patch: tuple[Sequence[int], list[Tensor]] | None = None):
        """logits [batch, pos, d_out]; with return_hidden, also the residual streams (embedding, then after
        each block) and each block's attention output. patch = (positions, hidden): overwrite the stream at
        `positions` with `hidden[l]` (from another run's return_hidden) before every block and at the end,
        so those positions compute nothing of their own (activation patching)."""
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} positions is longer than max_len {self.pos.shape[0]}")
        h = self.embed(x) + self.pos[:x.shape[1]]
        if patch is not None:
            positions, source = list(patch[0]), patch[1]
            if len(source) != len(self.blocks) + 1 or source[0].shape != h.shape:
                raise ValueError(f"patch needs {len(self.blocks) + 1} streams of shape {tuple(h.shape)}")
            h = h.clone()
            h[:, positions] = source[0][:, positions]
        hidden, attn_outs = [h], []
        for layer, block in enumerate(self.blocks):
            h, attn = block(h)
            if patch is not None:
                h = h.clone()
                h[:, positions] = source[layer + 1][:, positions]
            hidden.append(h)
            attn_outs.append(attn)
        logits = self.unembed(self.ln(h))
        return (logits, hidden, attn_outs) if return_hidden else logits


@dataclass
class ThreeSumConfig:
    """One toy experiment: task sizes, model sizes, training length."""

    n_min: int = 3
    n_max: int = 6
    dim: int = 3
    mod: int = 10
    d_model: int = 48
    n_layers: int = 3
    n_heads: int = 4
    steps: int = 1000
    batch_size: int = 128
    lr: float = 3e-3
    pos_scale: float = 0.1
    copy_targets: bool = False     # supervised fillers also output x_i and x_j (besides the complement)
    square_fillers: bool = False   # n_max**2 filler slots (Pfau et al.) instead of one per pair
    cot_rate: float = 0.5          # "filler + CoT mix": share of training strings with a chain of thought
    weight_decay: float = 0.01

    @property
    def n_pairs(self) -> int:
        return len(pair_index(self.n_max))

    def n_fillers(self, condition: str) -> int:
        _check_condition(condition)
        if condition not in FILLER_CONDITIONS:
            return 0
        return self.n_max ** 2 if self.square_fillers else self.n_pairs

    def d_in(self, condition: str) -> int:
        """Input width: digits and flags, and for "filler + CoT mix" a CoT flag and one pair block."""
        _check_condition(condition)
        return self.dim * self.mod + 4 + (1 + self.pair_block if condition == "filler + CoT mix" else 0)

    @property
    def pair_block(self) -> int:
        """Outputs per supervised pair: match (2), then the complement (and with copy_targets x_i, x_j)."""
        return 2 + (3 if self.copy_targets else 1) * self.dim * self.mod

    def d_out(self, condition: str) -> int:
        """Output width: the answer (2), then one pair block (at each filler) or every pair's block (at the
        answer position, for "no filler + supervision")."""
        _check_condition(condition)
        return 2 + (self.n_pairs if condition == "no filler + supervision" else 1) * self.pair_block


def _check_condition(condition: str) -> None:
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")


def make_three_sum_model(cfg: ThreeSumConfig, condition: str, seed: int = 0) -> TinyTransformer:
    """A fresh TinyTransformer sized for `cfg` and `condition` (outputs: see `ThreeSumConfig.d_out`)."""
    with torch.random.fork_rng():                  # seeded, without disturbing the caller's random stream
        torch.manual_seed(seed)
        return TinyTransformer(cfg.d_in(condition), cfg.d_out(condition), cfg.n_max + cfg.n_fillers(condition) + 1,
                               cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.pos_scale)


def three_sum_loss(model: TinyTransformer, x: Tensor, real: Tensor, cfg: ThreeSumConfig, condition: str,
                   supervise: bool | None = None, lab: dict[str, Tensor] | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(loss, correct [batch]). The loss is the answer's cross-entropy; with "filler + supervision" each
    filler position (i, j) also predicts whether its pair completes a triple, the complement -(x_i + x_j)
    and (with cfg.copy_targets) x_i and x_j: dense, parallelisable intermediate targets. "no filler +
    supervision" asks the answer position for all those targets at once. "filler + CoT mix": a random
    share cfg.cot_rate of the rows (drawn with `generator`) are CoT strings (see `_cot_mix_loss`).
    supervise=False: answer only, every row a filler string. lab: `three_sum_labels(x, real, cfg.mod)`."""
    _check_condition(condition)
    supervise = condition in SUPERVISED + ("filler + CoT mix",) if supervise is None else supervise
    lab = three_sum_labels(x, real, cfg.mod) if lab is None else lab
    n, n_fill = x.shape[1], cfg.n_fillers(condition)
    if condition == "filler + CoT mix":
        return _cot_mix_loss(model, x, real, cfg, lab, supervise, generator)
    logits = model(encode_three_sum(x, real, cfg.mod, n_fill).to(x.device))
    answer = logits[:, -1, :2]
    loss = F.cross_entropy(answer, lab["label"])
    if supervise:
        if condition == "no filler + supervision":     # [batch, n_pairs, pair_block] at the answer position
            out = logits[:, -1, 2:].reshape(x.shape[0], -1, cfg.pair_block)
        else:                                          # [batch, n_pairs, pair_block] at the filler positions
            out = logits[:, n:n + n_fill, 2:2 + cfg.pair_block]
        weight = lab["pair_real"].reshape(-1).float()
        aux = F.cross_entropy(out[..., :2].reshape(-1, 2), lab["pair"].reshape(-1), reduction="none")
        groups = [lab["complement"]] + ([lab["first"], lab["second"]] if cfg.copy_targets else [])
        for g, target in enumerate(groups):
            for c in range(cfg.dim):
                start = 2 + (g * cfg.dim + c) * cfg.mod
                aux = aux + F.cross_entropy(out[..., start:start + cfg.mod].reshape(-1, cfg.mod),
                                            target[..., c].reshape(-1), reduction="none") / cfg.dim
        loss = loss + (aux * weight).sum() / weight.sum().clamp_min(1)
    return loss, answer.argmax(-1) == lab["label"]


def three_sum_inputs(x: Tensor, real: Tensor, cfg: ThreeSumConfig, condition: str) -> Tensor:
    """Filler-string inputs for a model of `condition` (no CoT tokens; the CoT features, if any, are zero)."""
    feats = encode_three_sum(x, real, cfg.mod, cfg.n_fillers(condition))
    pad = cfg.d_in(condition) - feats.shape[-1]
    return F.pad(feats, (0, pad)) if pad else feats


def pair_targets(lab: dict[str, Tensor], cfg: ThreeSumConfig) -> Tensor:
    """One-hot pair results [batch, n_pairs, pair_block]: does the pair complete a triple (2), then the
    complement -(x_i + x_j), one-hot per coordinate; zero for pairs with a blank member."""
    onehot = torch.cat([F.one_hot(lab["pair"], 2), F.one_hot(lab["complement"], cfg.mod).flatten(-2)], -1)
    return onehot.float() * lab["pair_real"][..., None]


def _cot_mix_loss(model, x, real, cfg, lab, supervise, generator):
    """Pfau et al.'s mixture: rows drawn as CoT strings hold, in filler slot p, the previous pair's result
    (teacher forcing) and are trained to output pair p's result there; every row is trained on the answer."""
    n, n_fill, batch = x.shape[1], cfg.n_fillers("filler + CoT mix"), x.shape[0]
    if supervise:
        rows = torch.rand(batch, generator=generator) < cfg.cot_rate
    else:
        rows = torch.zeros(batch, dtype=torch.bool)
    target = pair_targets(lab, cfg)                                           # [batch, P, block]
    content = torch.cat([torch.zeros_like(target[:, :1]), target[:, :-1]], 1)   # slot p sees pair p-1
    logits = model(encode_three_sum(x, real, cfg.mod, n_fill, cot=(rows, content)).to(x.device))
    answer = logits[:, -1, :2]
    loss = F.cross_entropy(answer, lab["label"])
    if supervise and rows.any():
        out = logits[:, n:n + target.shape[1], 2:2 + cfg.pair_block][rows.to(x.device)]
        tgt = {key: lab[key][rows.to(x.device)] for key in ("pair", "complement", "pair_real")}
        aux = F.cross_entropy(out[..., :2].reshape(-1, 2), tgt["pair"].reshape(-1), reduction="none")
        for c in range(cfg.dim):
            start = 2 + c * cfg.mod
            aux = aux + F.cross_entropy(out[..., start:start + cfg.mod].reshape(-1, cfg.mod),
                                        tgt["complement"][..., c].reshape(-1), reduction="none") / cfg.dim
        weight = tgt["pair_real"].reshape(-1).float()
        loss = loss + (aux * weight).sum() / weight.sum().clamp_min(1)
    return loss, answer.argmax(-1) == lab["label"]


def train_three_sum(cfg: ThreeSumConfig, condition: str, seed: int = 0, progress: bool = False,
                    device: str | torch.device = "cpu", threads: int | None = 1,
                    chunk_steps: int = 100) -> tuple[TinyTransformer, np.ndarray]:
    """Train one TinyTransformer on fresh 3SUM batches: AdamW, linear warm-up over the first 10% of
    steps, then cosine decay. Returns the model (in eval mode, on `device`) and its loss at every step.

    Batches are drawn `chunk_steps` at a time (one call, labels computed once), which is the same data as
    drawing each batch on its own and faster. threads: torch CPU threads while training (a model this small
    trains about as fast on one, and far faster on a busy CPU: see `torch_threads`); None: the current setting."""
    from tqdm.auto import tqdm

    if chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    model = make_three_sum_model(cfg, condition, seed).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = np.zeros(cfg.steps)
    with torch_threads(threads):
        model.train()
        B = cfg.batch_size
        for step in tqdm(range(cfg.steps), desc=condition, disable=not progress, mininterval=2.0, leave=False):
            if step % chunk_steps == 0:
                n_chunk = min(chunk_steps, cfg.steps - step) * B
                xs, reals = three_sum_batch(n_chunk, cfg.n_min, cfg.n_max, cfg.dim, cfg.mod, gen)
                xs, reals = xs.to(device), reals.to(device)
                labs = three_sum_labels(xs, reals, cfg.mod)
                perm = torch.randperm(n_chunk, generator=gen).to(device)   # mix positives and negatives
            rows = perm[(step % chunk_steps) * B:(step % chunk_steps + 1) * B]
            lab = {key: value[rows] for key, value in labs.items()}
            loss, _ = three_sum_loss(model, xs[rows], reals[rows], cfg, condition, lab=lab, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses[step] = loss.item()
    return model.eval(), losses


@torch.no_grad()
def three_sum_accuracy(model: TinyTransformer, cfg: ThreeSumConfig, condition: str, n: int,
                       n_eval: int = 1000, seed: int = 1234) -> dict[str, float]:
    """Held-out accuracy on instances of exactly n real tuples, with its Wilson interval and the
    majority-class baseline."""
    if not cfg.n_min <= n <= cfg.n_max:
        raise ValueError(f"n = {n} is outside the trained range {cfg.n_min}..{cfg.n_max}")
    x, real = three_sum_batch(n_eval, n, n, cfg.dim, cfg.mod, torch.Generator().manual_seed(seed))
    x_full = torch.zeros(n_eval, cfg.n_max, cfg.dim, dtype=x.dtype)
    real_full = torch.zeros(n_eval, cfg.n_max, dtype=torch.bool)
    x_full[:, :n], real_full[:, :n] = x[:, :n], real[:, :n]
    device = next(model.parameters()).device
    _, correct = three_sum_loss(model, x_full.to(device), real_full.to(device), cfg, condition, supervise=False)
    label = three_sum_labels(x_full, real_full, cfg.mod)["label"].float().mean().item()
    k = int(correct.sum().item())
    low, high = wilson_interval(k, n_eval)
    return dict(n=n, accuracy=k / n_eval, low=low, high=high, baseline=max(label, 1 - label))


@torch.no_grad()
def three_sum_filler_patch(model: TinyTransformer, cfg: ThreeSumConfig, condition: str, n: int,
                           n_eval: int = 1000, seed: int = 4321, same_label: bool = False) -> dict[str, float]:
    """Do the filler positions carry the answer? Pair each held-out instance with one of the opposite label,
    copy the other instance's filler streams (every layer) into its run, and count how often the answer
    then follows the other instance's label ("follows_source"; 1 - follows_source keep their own, since the
    labels are opposite). A model that reads the answer off its fillers follows the source (near 1); one
    that ignores them keeps its own (near 0); a model at chance gives about 0.5 either way. Returns n, the
    clean accuracy, follows_source and its Wilson 95% interval (follows_low, follows_high).
    same_label=True: the source has the *same* label (a control: a model that reads its fillers still
    answers correctly, follows_source near its clean accuracy; a patch that merely breaks the run falls)."""
    _check_condition(condition)
    if cfg.n_fillers(condition) == 0:
        raise ValueError(f"the {condition!r} model has no filler positions to patch")
    if not cfg.n_min <= n <= cfg.n_max:
        raise ValueError(f"n = {n} is outside the trained range {cfg.n_min}..{cfg.n_max}")
    m = n_eval + (-n_eval) % 4
    x, real = three_sum_batch(m, n, n, cfg.dim, cfg.mod, torch.Generator().manual_seed(seed))
    x_full = torch.zeros(m, cfg.n_max, cfg.dim, dtype=x.dtype)
    real_full = torch.zeros(m, cfg.n_max, dtype=torch.bool)
    x_full[:, :n], real_full[:, :n] = x[:, :n], real[:, :n]
    label = three_sum_labels(x_full, real_full, cfg.mod)["label"]
    swap = torch.arange(m) ^ (2 if same_label else 1)            # rows alternate positive / negative
    if not ((label == label[swap]).all() if same_label else (label != label[swap]).all()):
        raise RuntimeError("paired rows do not have the intended labels")
    device = next(model.parameters()).device
    n_fill = cfg.n_fillers(condition)
    feats = three_sum_inputs(x_full, real_full, cfg, condition).to(device)
    logits, hidden, _ = model(feats, return_hidden=True)
    fillers = list(range(cfg.n_max, cfg.n_max + n_fill))
    patched = model(feats, patch=(fillers, [h[swap.to(device)] for h in hidden]))
    clean_answer = logits[:, -1, :2].argmax(-1).cpu()
    answer = patched[:, -1, :2].argmax(-1).cpu()
    follows = int((answer == label[swap]).sum().item())
    low, high = wilson_interval(follows, m)
    return dict(n=n, clean_accuracy=(clean_answer == label).float().mean().item(), follows_source=follows / m,
                follows_low=low, follows_high=high)
