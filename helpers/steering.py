"""Steering vs prompting (notebook 08): automatic concept scores, CAA vectors, batched steered runs.

    data = steering.load_concepts()                                       # data/steering_concepts.json
    texts = steering.generate(model, prompts, {layer: vectors}, n_new=16)  # greedy; one steering vector per row
    h = steering.harmonic_mean(np.stack([concept, fluency, relevance]))    # AxBench's combined score, per row

Scores, each in [0, 1] (no LLM judge offline; AxBench's judge gives 0-2 and we rescale the same way):
- concept: lexicon hits in the generated text, saturating at `saturate` hits (`concept_score`);
- fluency: (1 - repetition rate) * min(1, reference perplexity / perplexity), the perplexity of the text alone
  under the unsteered model from its second token (`perplexity(skip=1)`), or as the continuation of a prompt
  (`conditional_perplexity`) (`fluency_score`);
- relevance: min(1, exp(mean log-prob of a reference answer - the unsteered one)) (`relevance_score`).
Steering vectors are added at every real token after BOS (prompt and generated tokens) through
`helpers.interventions.steering`, one vector per row of a batch, so a whole coefficient sweep runs as one batch.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from helpers import interventions as I

Steer = Mapping[int, Tensor]   # layer -> [n_rows, d_model] vectors (a zero row: that row is not steered)


# ---------------------------------------------------------------------------------------------
# data and prompts
def load_concepts(path: str | Path | None = None) -> dict:
    """data/steering_concepts.json: concepts (lexicon, texts, instructions, few-shot turns), neutral texts,
    user questions with reference answers."""
    from helpers.env import DATA

    path = Path(path) if path is not None else DATA / "steering_concepts.json"
    if not path.is_file():
        raise FileNotFoundError(f"no steering data at {path}")
    return json.loads(path.read_text())


def chat_prompt(tokenizer, user: str, system: str | None = None, history: Sequence[Sequence[str]] = (),
                strip_bos: bool = True) -> str:
    """The model's chat template for `history` ((user, assistant) turns) then `user`, ready for the assistant
    to answer. The leading BOS text is stripped (the bridge prepends BOS itself) so the tokens equal the
    template's. A tokenizer with no chat template gets a plain 'Q: ... A:' format."""
    if not isinstance(user, str) or not user:
        raise ValueError("user must be a non-empty string")
    if getattr(tokenizer, "chat_template", None) is None:
        turns = "".join(f"Q: {q}\nA: {a}\n" for q, a in history)
        return (f"{system}\n" if system else "") + turns + f"Q: {user}\nA:"
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    text = tokenizer.apply_chat_template(msgs + [{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    return text[len(bos):] if strip_bos and bos and text.startswith(bos) else text


# ---------------------------------------------------------------------------------------------
# scores of text
def _pattern(lexicon: Sequence[str]) -> re.Pattern:
    if not lexicon or not all(isinstance(w, str) and w for w in lexicon):
        raise ValueError("lexicon must be a non-empty list of words")
    words = "|".join(sorted((re.escape(w.lower()) for w in lexicon), key=len, reverse=True))
    return re.compile(rf"(?<![\w'])(?:{words})(?:s|es)?(?![\w'])", re.IGNORECASE)


def lexicon_hits(text: str, lexicon: Sequence[str]) -> int:
    """How many times a lexicon word (or its plural in -s/-es) occurs as a whole word, case-insensitive."""
    return len(_pattern(lexicon).findall(text))


def concept_score(text: str, lexicon: Sequence[str], saturate: int = 2) -> float:
    """min(hits, saturate) / saturate: 0 = the concept is absent, 1 = clearly present (like AxBench's 0-2)."""
    if saturate < 1:
        raise ValueError("saturate must be >= 1")
    return min(lexicon_hits(text, lexicon), saturate) / saturate


def repetition_rate(text: str, n: int = 2) -> float:
    """1 - distinct word n-grams / word n-grams (0: no repeated n-gram; 0 when there are fewer than 2)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if len(grams) < 2 else 1.0 - len(set(grams)) / len(grams)


def fluency_score(perplexity: np.ndarray, reference: float, repetition: np.ndarray) -> np.ndarray:
    """(1 - repetition) * min(1, reference / perplexity): 1 = as fluent as the reference perplexity, no repeats.
    An infinite or NaN perplexity (empty text) scores 0."""
    ppl = np.asarray(perplexity, dtype=float)
    if not reference > 0:
        raise ValueError("the reference perplexity must be positive")
    ratio = np.where(np.isfinite(ppl) & (ppl > 0), reference / np.where(ppl > 0, ppl, 1.0), 0.0)
    return (1.0 - np.asarray(repetition, dtype=float)) * np.minimum(1.0, ratio)


def relevance_score(logprob: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """min(1, exp(logprob - reference)): the per-token probability of the reference answer relative to the
    unsteered model's (1 = at least as likely as without the intervention)."""
    return np.minimum(1.0, np.exp(np.asarray(logprob, dtype=float) - np.asarray(reference, dtype=float)))


def harmonic_mean(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """Harmonic mean along `axis` (AxBench combines concept, instruction and fluency scores this way);
    0 wherever any score is 0. Scores must be >= 0."""
    s = np.asarray(scores, dtype=float)
    if (s < 0).any() or not np.isfinite(s).all():
        raise ValueError("scores must be finite and >= 0")
    zero = (s == 0).any(axis=axis)
    inv = (1.0 / np.where(s == 0, 1.0, s)).sum(axis=axis)
    return np.where(zero, 0.0, s.shape[axis] / inv)


# ---------------------------------------------------------------------------------------------
# activations and vectors
@torch.no_grad()
def text_means(model, texts: Sequence[str], layers: Sequence[int], batch_size: int = 32) -> Tensor:
    """Mean residual stream over each text's tokens after BOS: [len(layers), n_texts, d_model]."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = I.to_tokens(model, list(texts[i:i + batch_size]))
        keep = I.position_mask(I.attention_mask(model, tokens), I.AFTER_BOS).float()      # [b, seq]
        resid = I.residual_stream(model, tokens, layers=layers, pos=None)                 # [L, b, seq, d]
        out.append((resid * keep[None, :, :, None]).sum(2) / keep.sum(1)[None, :, None])
    return torch.cat(out, 1)


@torch.no_grad()
def typical_norm(model, texts: Sequence[str], layers: Sequence[int]) -> Tensor:
    """Median norm of the residual stream over every token after BOS of `texts`, per layer: [len(layers)]."""
    tokens = I.to_tokens(model, list(texts))
    keep = I.position_mask(I.attention_mask(model, tokens), I.AFTER_BOS)
    resid = I.residual_stream(model, tokens, layers=layers, pos=None)
    return torch.stack([resid[k][keep].norm(dim=-1).median() for k in range(len(layers))])


def _steered(model, steer: Steer | None, rows: Sequence[int] | slice) -> ExitStack:
    stack = ExitStack()
    for layer, vectors in (steer or {}).items():
        v = vectors[rows]
        if v.abs().sum() > 0:
            stack.enter_context(I.steering(model, v, layer))
    return stack


def _check_steer(steer: Steer | None, n: int) -> None:
    for layer, v in (steer or {}).items():
        if v.ndim != 2 or v.shape[0] != n:
            raise ValueError(f"steer[{layer}] must be [{n}, d_model] (one vector per row), got {tuple(v.shape)}")


@torch.no_grad()
def generate(model, prompts: Sequence[str], steer: Steer | None = None, n_new: int = 16,
             batch_size: int = 32) -> list[str]:
    """Greedy continuations (text after the prompt, cut at EOS), each row steered by its own vectors
    (`steer`: layer -> [n, d_model]; zero rows unsteered). Rows are batched by prompt length."""
    if not prompts:
        raise ValueError("no prompts")
    _check_steer(steer, len(prompts))
    lengths = [I.to_tokens(model, p).shape[1] for p in prompts]
    order = np.argsort(lengths, kind="stable")
    out: list[str] = [""] * len(prompts)
    eos = model.tokenizer.eos_token_id
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size].tolist()
        batch = [prompts[r] for r in rows]
        with _steered(model, steer, rows):
            seq = model.generate(batch, max_new_tokens=n_new, do_sample=False, verbose=False, stop_at_eos=False,
                                 return_type="tokens", padding_side="left")
        for r, new in zip(rows, seq[:, I.to_tokens(model, batch).shape[1]:].tolist()):
            new = new[:new.index(eos)] if eos in new else new
            out[r] = model.tokenizer.decode(new, skip_special_tokens=True).strip()
    return out


@torch.no_grad()
def answer_scores(model, prompts: Sequence[str], answers: Sequence[str], steer: Steer | None = None,
                  concept_ids: Sequence[int] | None = None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced: (mean log-prob per token of each answer after its prompt, mean over the answer's positions
    of log P(next token in `concept_ids`)); NaN for the second when concept_ids is None. Steered as `generate`."""
    if len(prompts) != len(answers):
        raise ValueError("one answer per prompt")
    _check_steer(steer, len(prompts))
    lp, cm = np.zeros(len(prompts)), np.full(len(prompts), np.nan)
    ids = torch.tensor(list(concept_ids)) if concept_ids is not None else None
    for i in range(0, len(prompts), batch_size):
        rows = list(range(i, min(i + batch_size, len(prompts))))
        n_ans = [len(model.tokenizer.encode(answers[r], add_special_tokens=False)) for r in rows]
        tokens = I.to_tokens(model, [prompts[r] + answers[r] for r in rows])
        with _steered(model, steer, rows):
            logits = model(tokens, attention_mask=I.attention_mask(model, tokens))
            logp = logits[:, -max(n_ans) - 1:-1].float().log_softmax(-1)      # answer positions only
        for j, (r, n) in enumerate(zip(rows, n_ans)):
            pred, target = logp[j, logp.shape[1] - n:], tokens[j, -n:].to(logp.device)
            lp[r] = pred.gather(-1, target[:, None]).mean().item()
            if ids is not None:
                cm[r] = pred[:, ids.to(logp.device)].logsumexp(-1).mean().item()
    return lp, cm


@torch.no_grad()
def perplexity(model, texts: Sequence[str], batch_size: int = 32, skip: int = 0) -> np.ndarray:
    """Perplexity of each text on its own (after BOS) under the unsteered model, leaving the first `skip` tokens
    after BOS unscored (skip=1: the token right after a chat model's BOS such as `<|im_start|>`, where the model
    expects a role name); inf for an empty text or one with no scored token."""
    if skip < 0:
        raise ValueError("skip must be >= 0")
    out = np.full(len(texts), np.inf)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    for i in range(0, len(keep), batch_size):
        rows = keep[i:i + batch_size]
        tokens = I.to_tokens(model, [texts[r] for r in rows])
        mask = I.attention_mask(model, tokens).bool()
        pos = mask.long().cumsum(1) - 1                            # position inside each text: 0 = BOS
        logp = model(tokens, attention_mask=I.attention_mask(model, tokens)).float().log_softmax(-1)
        nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]
        m = (mask[:, 1:] & mask[:, :-1] & (pos[:, 1:] > skip)).to(nll.device)   # real tokens after BOS + skip
        n = m.sum(1)
        ppl = (nll * m).sum(1).div(n.clamp_min(1)).exp().cpu().numpy()
        out[rows] = np.where(n.cpu().numpy() > 0, ppl, np.inf)
    return out


@torch.no_grad()
def conditional_perplexity(model, prompts: Sequence[str], texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Perplexity of each text as the continuation of its prompt under the unsteered model (only the text's
    tokens are scored, so no token right after BOS is); inf for an empty text."""
    if len(prompts) != len(texts):
        raise ValueError("one prompt per text")
    out = np.full(len(texts), np.inf)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if keep:
        lp, _ = answer_scores(model, [prompts[i] for i in keep], [texts[i] for i in keep], batch_size=batch_size)
        out[keep] = np.exp(-lp)
    return out


def concept_token_ids(tokenizer, lexicon: Sequence[str]) -> list[int]:
    """First token of each lexicon word written ' word' and ' Word' (deduplicated): the concept's tokens for
    the model's own log-prob score."""
    if not lexicon:
        raise ValueError("empty lexicon")
    return sorted({tokenizer.encode(f" {v}", add_special_tokens=False)[0] for w in lexicon for v in (w, w.capitalize())})


def step_share(values: Sequence[float]) -> float:
    """Largest rise between neighbouring points / rise from the first point to the curve's maximum (1/(n-1) for
    a straight line, 1 for a single step). A curve that never rises above its first point raises ValueError."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) < 2 or not np.isfinite(v).all():
        raise ValueError("need a finite 1-D curve of at least two points")
    total = v.max() - v[0]
    if not total > 0:
        raise ValueError("the curve never rises above its first point")
    return float(np.diff(v).max() / total)
