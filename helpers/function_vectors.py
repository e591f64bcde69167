"""Function vectors (Todd et al. 2023, arXiv 2310.15213): in-context-learning prompts, per-head mean outputs,
average indirect effects (AIE) of attention heads, and function vectors built from the top heads.

    tasks = load_tasks(["antonym", "country_capital"])
    clean = icl_prompts(tasks["antonym"].train, n_prompts=20, n_shots=10, seed=0)
    logits, z = last_token_logits(model, [p.text for p in clean], capture_z=True)   # z: [n, L, H, d_head]
    mean_z = z.mean(0)                                                              # [L, H, d_head]
    aie = indirect_effects(model, corrupted_texts, answer_ids, mean_z)              # [n, L, H]
    fv = function_vector(model, mean_z, top_heads(aie.mean(0), k=10))               # [d_model]
    steered = add_to_last(model, zero_shot_texts, fv, layer=9)                       # logits [n, vocab]

Conventions (see notebooks/README.md): a head's *output* is its slice of ``blocks.L.attn.hook_z`` times its
slice of ``W_O`` ([head, d_head, d_model]); summing it over heads and adding ``b_O`` gives ``hook_attn_out``.
Function vectors are added to the residual stream entering block ``layer`` at the last prompt position.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import Tensor

from helpers import interventions as I
from helpers.env import DATA

TASKS_FILE = "function_vector_tasks.json"

Head = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# tasks and prompts
@dataclass(frozen=True)
class Task:
    """One input -> output task, its pairs split into a demonstration/training half and a held-out half."""

    name: str
    description: str
    pairs: tuple[tuple[str, str], ...]
    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]


def load_tasks(names: Sequence[str] | None = None, path: Path | str | None = None, test_fraction: float = 0.4,
               seed: int = 0) -> dict[str, Task]:
    """The tasks in data/function_vector_tasks.json (or `path`), each split once into train/test pairs.

    `names` picks and orders tasks (default: all). Test queries never appear in a training prompt."""
    path = Path(path) if path is not None else DATA / TASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    raw = json.loads(path.read_text())["tasks"]
    if isinstance(names, str):
        names = [names]
    names = list(raw) if names is None else list(names)
    unknown = [n for n in names if n not in raw]
    if unknown:
        raise KeyError(f"unknown tasks {unknown}; the file has {sorted(raw)}")
    tasks = {}
    for name in names:
        pairs = tuple((str(x), str(y)) for x, y in raw[name]["pairs"])
        order = list(range(len(pairs)))
        random.Random(f"{seed}-{name}").shuffle(order)
        n_test = max(1, int(round(test_fraction * len(pairs))))
        test = tuple(pairs[i] for i in order[:n_test])
        train = tuple(pairs[i] for i in order[n_test:])
        tasks[name] = Task(name, raw[name].get("description", ""), pairs, train, test)
    return tasks


@dataclass(frozen=True)
class Template:
    """How one demonstration is written: `query` with {x}, then `answer` with {y}; demonstrations joined by `sep`."""

    query: str = "Q: {x}\nA:"
    answer: str = " {y}"
    sep: str = "\n\n"

    def demo(self, x: str, y: str) -> str:
        return self.query.format(x=x) + self.answer.format(y=y)


TEMPLATES: dict[str, Template] = {
    "qa": Template("Q: {x}\nA:", " {y}", "\n\n"),
    "arrow": Template("{x} ->", " {y}", "\n"),
    "io": Template("input: {x}\noutput:", " {y}", "\n\n"),
}

# Natural-text zero-shot templates (Todd et al. sec. 3.2 use sentences like these); the answer follows a space.
NATURAL_TEMPLATES: tuple[str, ...] = (
    "The word '{x}' means",
    "When I think of {x}, I think of",
    "{x}, in other words,",
)


@dataclass(frozen=True)
class Prompt:
    text: str
    query: str
    answer: str  # with its leading space, e.g. " cold"


def _template(template: Template | str) -> Template:
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise KeyError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)} or pass a Template")
        return TEMPLATES[template]
    if not isinstance(template, Template):
        raise TypeError(f"template must be a Template or a name, got {type(template).__name__}")
    return template


def icl_text(demos: Sequence[tuple[str, str]], query: str, template: Template | str = "qa") -> str:
    """Demonstrations then the query, e.g. 'Q: hot\\nA: cold\\n\\nQ: big\\nA:'. No demos: a zero-shot prompt."""
    t = _template(template)
    return t.sep.join([t.demo(x, y) for x, y in demos] + [t.query.format(x=query)])


def icl_prompts(demo_pairs: Sequence[tuple[str, str]], n_prompts: int, n_shots: int, seed: int = 0,
                template: Template | str = "qa", query_pairs: Sequence[tuple[str, str]] | None = None,
                shuffle_labels: bool = False) -> list[Prompt]:
    """`n_prompts` prompts of `n_shots` demonstrations from `demo_pairs` and a query from `query_pairs`
    (default: also `demo_pairs`, never repeating the query inside its own demonstrations).

    shuffle_labels=True permutes the demonstrations' outputs among themselves (no output stays with its input
    when n_shots > 1): the "corrupted" prompts of Todd et al., which show the format but not the task."""
    t = _template(template)
    if n_shots < 0 or n_prompts < 1:
        raise ValueError(f"need n_shots >= 0 and n_prompts >= 1, got {n_shots}, {n_prompts}")
    query_pairs = list(demo_pairs if query_pairs is None else query_pairs)
    demo_pairs = list(demo_pairs)
    if n_shots > len(demo_pairs) - 1:
        raise ValueError(f"{n_shots} shots need at least {n_shots + 1} demonstration pairs, have {len(demo_pairs)}")
    rng = random.Random(seed)
    order = rng.sample(range(len(query_pairs)), len(query_pairs))  # each query once before any repeats
    out = []
    for i in range(n_prompts):
        x, y = query_pairs[order[i % len(order)]]
        pool = [p for p in demo_pairs if p[0] != x]
        demos = rng.sample(pool, n_shots)
        if shuffle_labels and n_shots > 1:
            labels = [d[1] for d in demos]
            perm = _derangement(len(labels), rng)
            demos = [(d[0], labels[j]) for d, j in zip(demos, perm)]
        out.append(Prompt(icl_text(demos, x, t), x, t.answer.format(y=y)))
    return out


def _derangement(n: int, rng: random.Random) -> list[int]:
    """A random permutation of range(n) with no fixed point (n >= 2)."""
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm


def zero_shot_prompts(pairs: Sequence[tuple[str, str]], template: Template | str = "qa") -> list[Prompt]:
    """One zero-shot prompt per pair (the query alone, in `template` or a natural-text format string with {x})."""
    if isinstance(template, str) and "{x}" in template:
        return [Prompt(template.format(x=x), x, " " + y) for x, y in pairs]
    t = _template(template)
    return [Prompt(t.query.format(x=x), x, t.answer.format(y=y)) for x, y in pairs]


def as_zero_shot(prompts: Sequence[Prompt], template: Template | str = "qa") -> list[Prompt]:
    """The same queries and answers with no demonstrations (in `template`, or a natural format string with {x})."""
    if isinstance(template, str) and "{x}" in template:
        return [Prompt(template.format(x=p.query), p.query, p.answer) for p in prompts]
    t = _template(template)
    return [Prompt(t.query.format(x=p.query), p.query, p.answer) for p in prompts]


def texts(prompts: Sequence[Prompt]) -> list[str]:
    """The prompt strings of a list of Prompts."""
    return [p.text for p in prompts]


def answer_ids(model, prompts: Sequence[Prompt] | Sequence[str]) -> Tensor:
    """The first token of each answer (scoring uses the first token, as in Todd et al.): [n] long."""
    texts = [p.answer if isinstance(p, Prompt) else p for p in prompts]
    ids = []
    for text in texts:
        toks = model.tokenizer.encode(text, add_special_tokens=False)
        if not toks:
            raise ValueError(f"answer {text!r} has no tokens")
        ids.append(toks[0])
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# running prompts
def _z_names(model) -> list[str]:
    return [I.hook_name(model, "z", layer) for layer in range(I.n_layers(model))]


@torch.no_grad()
def last_token_logits(model, prompts: Sequence[str], batch_size: int = 16, capture_z: bool = False,
                      fwd_hooks: Sequence = ()) -> tuple[Tensor, Tensor | None]:
    """Logits at each prompt's last token ([n, vocab]) and, with capture_z, every head's z there
    ([n, n_layers, n_heads, d_head]). Batches are left-padded so position -1 is every last token."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    names = _z_names(model)
    out_logits, out_z = [], []
    for start in range(0, len(prompts), batch_size):
        tokens = I.to_tokens(model, list(prompts[start:start + batch_size]))
        store: dict[str, Tensor] = {}
        hooks = list(fwd_hooks)
        if capture_z:
            def grab(act, hook):
                store[hook.name] = act[:, -1].detach().clone()
            hooks += [(n, grab) for n in names]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=I.attention_mask(model, tokens))
        out_logits.append(logits[:, -1].float())
        if capture_z:
            out_z.append(torch.stack([store[n] for n in names], dim=1))
    z = torch.cat(out_z) if capture_z else None
    return torch.cat(out_logits), z


def accuracy(logits: Tensor, answers: Tensor) -> float:
    """Fraction of rows whose top-1 token is the answer's first token."""
    if logits.shape[0] != answers.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {answers.shape[0]} answers")
    return (logits.argmax(-1).cpu() == answers.cpu()).float().mean().item()


@torch.no_grad()
def correct(model, prompts: Sequence[Prompt], vector: Tensor | None = None, layer: int | None = None,
            scale: float = 1.0, batch_size: int = 64) -> Tensor:
    """Whether the model's top-1 next token is each prompt's answer (first token): [n] bool. With `vector`
    ([d_model], or [n, d_model] one per prompt), scale * vector is added to the residual stream entering `layer`
    at the last position first."""
    if not prompts or not all(isinstance(p, Prompt) for p in prompts):
        raise TypeError("prompts must be a non-empty list of Prompt (see icl_prompts, zero_shot_prompts)")
    if vector is None:
        logits, _ = last_token_logits(model, texts(prompts), batch_size=batch_size)
    else:
        if layer is None:
            raise ValueError("give the layer to add the vector at")
        logits = add_to_last(model, texts(prompts), vector, layer, scale=scale, batch_size=batch_size)
    return logits.argmax(-1).cpu() == answer_ids(model, prompts)


def answer_probs(logits: Tensor, answers: Tensor) -> Tensor:
    """Probability of each row's answer token: [n]."""
    return logits.float().softmax(-1).gather(-1, answers.to(logits.device)[:, None])[:, 0].cpu()


# ---------------------------------------------------------------------------------------------
# head outputs and function vectors
def W_O(model) -> Tensor:
    """Every layer's output weights stacked: [n_layers, n_heads, d_head, d_model]."""
    return torch.stack([model.blocks[layer].attn.W_O.detach() for layer in range(I.n_layers(model))])


def head_outputs(model, z: Tensor) -> Tensor:
    """Each head's contribution to the residual stream, z @ W_O: [..., L, H, d_head] -> [..., L, H, d_model]."""
    w = W_O(model)
    if z.shape[-3:] != w.shape[:3]:
        raise ValueError(f"z must end in (n_layers, n_heads, d_head) = {tuple(w.shape[:3])}, got {tuple(z.shape)}")
    return torch.einsum("...lhd,lhdm->...lhm", z.to(device=w.device, dtype=w.dtype), w)


def _check_heads(model, heads: Sequence[Head]) -> list[Head]:
    n_l, n_h = I.n_layers(model), int(model.cfg.n_heads)
    out = []
    for head in heads:
        layer, h = int(head[0]), int(head[1])
        if not (0 <= layer < n_l and 0 <= h < n_h):
            raise IndexError(f"head {head} out of range: layers 0..{n_l - 1}, heads 0..{n_h - 1}")
        out.append((layer, h))
    return out


def function_vector(model, mean_z: Tensor, heads: Sequence[Head]) -> Tensor:
    """Sum of the listed heads' mean outputs (mean_z: [L, H, d_head]): the function vector, [d_model]."""
    heads = _check_heads(model, heads)
    if not heads:
        return torch.zeros(model.cfg.d_model, device=model.cfg.device)
    outs = head_outputs(model, mean_z)
    return torch.stack([outs[layer, h] for layer, h in heads]).sum(0)


def top_heads(scores: Tensor, k: int) -> list[Head]:
    """The k (layer, head) pairs with the largest scores ([L, H]), best first."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_layers, n_heads], got shape {tuple(scores.shape)}")
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k must be in 0..{scores.numel()}, got {k}")
    idx = scores.flatten().topk(k).indices.tolist()
    return [divmod(i, scores.shape[1]) for i in idx]


def random_heads(n_layers: int, n_heads: int, k: int, seed: int = 0, exclude: Sequence[Head] = ()) -> list[Head]:
    """k distinct random (layer, head) pairs, none of them in `exclude`: the random-heads control."""
    pool = [(layer, h) for layer in range(n_layers) for h in range(n_heads) if (layer, h) not in set(exclude)]
    if k > len(pool):
        raise ValueError(f"cannot draw {k} heads from {len(pool)}")
    return random.Random(seed).sample(pool, k)


@torch.no_grad()
def add_to_last(model, prompts: Sequence[str], vector: Tensor, layer: int, scale: float = 1.0,
                batch_size: int = 64) -> Tensor:
    """Last-token logits with scale * vector added to the residual stream entering `layer` at the last position.
    `vector`: [d_model] for every prompt, or [n_prompts, d_model], one row per prompt."""
    vector = torch.as_tensor(vector)
    if vector.ndim == 2 and vector.shape[0] != len(prompts):
        raise ValueError(f"{vector.shape[0]} vectors for {len(prompts)} prompts")
    if vector.ndim not in (1, 2):
        raise ValueError(f"vector must be [d_model] or [n_prompts, d_model], got shape {tuple(vector.shape)}")
    chunks = [I.add_vector(model, list(prompts[s:s + batch_size]), vector if vector.ndim == 1 else vector[s:s + batch_size],
                           layer, scale=scale, pos=-1)
              for s in range(0, len(prompts), batch_size)]
    return torch.cat(chunks).float()


def correct_by_task(model, prompts: dict[str, Sequence[Prompt]], vectors: dict[str, Tensor] | None = None,
                    layer: int | None = None, scale: float = 1.0, batch_size: int = 64) -> dict[str, Tensor]:
    """`correct` for several tasks at once, all prompts in shared batches (each task's prompts get that task's
    vector, when `vectors` is given): {task: [n_task] bool}. The same numbers as one `correct` call per task."""
    names = list(prompts)
    flat = [p for name in names for p in prompts[name]]
    rows = None
    if vectors is not None:
        missing = [name for name in names if name not in vectors]
        if missing:
            raise KeyError(f"no vector for tasks {missing}")
        rows = torch.stack([torch.as_tensor(vectors[name]) for name in names for _ in prompts[name]])
    hits = correct(model, flat, rows, layer, scale=scale, batch_size=batch_size)
    sizes = [len(prompts[name]) for name in names]
    return dict(zip(names, hits.split(sizes)))


# ---------------------------------------------------------------------------------------------
# average indirect effect, with all head patches packed into one forward pass
def packed_inputs(tokens: Tensor, n_copies: int, dtype: torch.dtype = torch.float32,
                  block: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """One prompt's tokens [1, T] -> (tokens [1, T-block+n_copies*block], 4-D additive attention mask, position ids).

    The prompt's last `block` tokens are repeated `n_copies` times; every copy sits at the original positions,
    attends to the shared prefix and causally within itself only. Each copy therefore computes exactly what the
    unpacked prompt computes there, and an intervention on one copy cannot reach another: many patched runs in
    one forward pass."""
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"pack one prompt at a time: tokens must be [1, T], got {tuple(tokens.shape)}")
    if n_copies < 1 or not 1 <= block <= tokens.shape[1]:
        raise ValueError(f"need n_copies >= 1 and 1 <= block <= T, got {n_copies}, {block}")
    prefix_len = tokens.shape[1] - block
    seq = torch.cat([tokens[:, :prefix_len], tokens[:, prefix_len:].repeat(1, n_copies)], dim=1)
    size = prefix_len + n_copies * block
    allowed = torch.zeros(size, size, dtype=torch.bool, device=tokens.device)
    allowed[:prefix_len, :prefix_len] = torch.tril(torch.ones(prefix_len, prefix_len, dtype=torch.bool))
    allowed[prefix_len:, :prefix_len] = True
    within = torch.tril(torch.ones(block, block, dtype=torch.bool))
    allowed[prefix_len:, prefix_len:] = torch.block_diag(*[within] * n_copies)
    mask = torch.zeros(size, size, dtype=dtype, device=tokens.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    positions = torch.cat([torch.arange(prefix_len), torch.arange(prefix_len, prefix_len + block).repeat(n_copies)])
    return seq, mask[None, None], positions[None].to(tokens.device)


@torch.no_grad()
def patched_last_logits(model, prompt: str, patches: Sequence[dict[Head, Tensor]]) -> Tensor:
    """Last-token logits of `prompt` under each patch set (a dict (layer, head) -> z value [d_head] that replaces
    that head's z at the last position), all in one packed forward pass: [len(patches), vocab].
    An empty dict is the unpatched run."""
    if not patches:
        raise ValueError("give at least one patch set ({} is the clean run)")
    tokens = I.to_tokens(model, prompt)
    seq, mask, positions = packed_inputs(tokens, len(patches))
    prefix_len = tokens.shape[1] - 1
    by_layer: dict[int, list[tuple[int, int, Tensor]]] = {}
    for i, patch_set in enumerate(patches):
        for head, value in patch_set.items():
            layer, h = _check_heads(model, [head])[0]
            by_layer.setdefault(layer, []).append((prefix_len + i, h, value))
    hooks = []
    for layer, items in by_layer.items():
        pos = torch.tensor([p for p, _, _ in items])
        hh = torch.tensor([h for _, h, _ in items])
        vals = torch.stack([v for _, _, v in items])

        def hook(z, hook, pos=pos, hh=hh, vals=vals):
            z[0, pos, hh] = vals.to(z.dtype).to(z.device)
            return z
        hooks.append((I.hook_name(model, "z", layer), hook))
    logits = model.run_with_hooks(seq, fwd_hooks=hooks, attention_mask=mask, position_ids=positions)
    return logits[0, prefix_len:].float()


@torch.no_grad()
def indirect_effects(model, prompts: Sequence[str], answers: Tensor, mean_z: Tensor,
                     heads: Sequence[Head] | None = None, max_copies: int = 300) -> Tensor:
    """Indirect effect of each head on each (corrupted) prompt: p(answer) with that head's z at the last token
    replaced by its clean mean `mean_z[l, h]`, minus p(answer) unpatched. Returns [n_prompts, L, H]
    (heads not in `heads` are NaN). Average over prompts for the AIE of Todd et al."""
    n_l, n_h = I.n_layers(model), int(model.cfg.n_heads)
    if mean_z.shape[:2] != (n_l, n_h):
        raise ValueError(f"mean_z must be [n_layers, n_heads, d_head] = [{n_l}, {n_h}, ...], got {tuple(mean_z.shape)}")
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    heads = [(layer, h) for layer in range(n_l) for h in range(n_h)] if heads is None else _check_heads(model, heads)
    out = torch.full((len(prompts), n_l, n_h), float("nan"))
    chunk = max(1, max_copies - 1)
    for i, prompt in enumerate(prompts):
        for start in range(0, len(heads), chunk):
            block = heads[start:start + chunk]
            patch_sets = [{}] + [{head: mean_z[head]} for head in block]
            probs = patched_last_logits(model, prompt, patch_sets).softmax(-1)[:, int(answers[i])]
            for head, p in zip(block, probs[1:]):
                out[i, head[0], head[1]] = p - probs[0]
    return out


# ---------------------------------------------------------------------------------------------
# nulls, reliability and baselines for the head ranking and the function vector
def top_share(scores: Tensor, k: int) -> float:
    """Share of the positive part of `scores` ([L, H]) held by its k largest entries (0 when none is positive)."""
    positive = scores.clamp_min(0).flatten()
    total = positive.sum().item()
    return positive.topk(k).values.sum().item() / total if total > 0 else 0.0


def head_permutation_null(per_prompt: Tensor, k: int, n_perm: int = 500, seed: int = 0) -> Tensor:
    """Null of `top_share` for per-prompt indirect effects [n, L, H]: each prompt's values are shuffled across
    heads independently before averaging, so no head is consistently important. Returns [n_perm] shares."""
    if per_prompt.ndim != 3:
        raise ValueError(f"per_prompt must be [n_prompts, n_layers, n_heads], got {tuple(per_prompt.shape)}")
    gen = torch.Generator().manual_seed(seed)
    flat = per_prompt.flatten(1)
    out = []
    for _ in range(n_perm):
        perm = torch.argsort(torch.rand(flat.shape, generator=gen), dim=1).to(flat.device)
        out.append(top_share(flat.gather(1, perm).mean(0).reshape(per_prompt.shape[1:]), k))
    return torch.tensor(out)


def random_depth_null(n_layers: int, n_heads: int, k: int, n_draws: int = 2000, seed: int = 0) -> Tensor:
    """Mean layer / n_layers of k distinct random heads, n_draws times: the null of a head set's depth."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.stack([torch.randperm(n_layers * n_heads, generator=gen)[:k] for _ in range(n_draws)])
    return (draws // n_heads).float().mean(1) / n_layers


def split_half_reliability(per_prompt: Tensor, n_splits: int = 50, seed: int = 0) -> float:
    """Mean Spearman correlation (scipy; ties share their mean rank), over random halvings of the prompts, between the heads' AIE from one half and
    from the other (per_prompt: [n >= 2, L, H]): how reproducible the head ranking is with this many prompts."""
    n = per_prompt.shape[0]
    if per_prompt.ndim != 3 or n < 2:
        raise ValueError("need per-prompt effects [n >= 2, L, H]")
    gen = torch.Generator().manual_seed(seed)
    rhos = []
    for _ in range(n_splits):
        perm = torch.randperm(n, generator=gen)
        a, b = per_prompt[perm[:n // 2]].mean(0).flatten(), per_prompt[perm[n // 2:]].mean(0).flatten()
        rhos.append(float(spearmanr(a.cpu().numpy(), b.cpu().numpy()).statistic))
    return float(sum(rhos) / len(rhos))


def norm_matched_random(vector: Tensor, seed: int = 0) -> Tensor:
    """A random Gaussian direction with the same norm as `vector`: the control for any added vector."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(vector.shape, generator=gen).to(vector.device)   # drawn on the CPU: the same draw on any device
    return r * (vector.float().norm() / r.norm())


@torch.no_grad()
def decode_top_tokens(model, vector: Tensor, k: int = 5) -> list[str]:
    """The k tokens a vector promotes when read through the final norm and unembedding (as Todd et al. sec. 4)."""
    logits = I.unembed(model, torch.as_tensor(vector)[None].to(model.cfg.device)).float()[0]
    return [model.tokenizer.decode([int(t)]) for t in logits.topk(k).indices]


def resid_hooks(model) -> tuple[list, dict[int, list[Tensor]]]:
    """Forward hooks (for `last_token_logits(fwd_hooks=...)`) that keep the residual stream entering every block
    at the last position, and the store they fill: {layer: [batch tensors [b, d_model]]}."""
    store: dict[int, list[Tensor]] = {}

    def grab(act, hook, layer):
        store.setdefault(layer, []).append(act[:, -1].detach().float().cpu())
    hooks = [(I.resid_name(model, layer), lambda act, hook, layer=layer: grab(act, hook, layer))
             for layer in range(I.n_layers(model))]
    return hooks, store


@torch.no_grad()
def whole_answer_correct(model, prompts: Sequence[Prompt], batch_size: int = 16) -> Tensor:
    """Whether greedy decoding would produce every token of each answer (teacher-forced: each answer token is
    the top-1 prediction given the prompt and the answer tokens before it): [n] bool. For one-token answers
    this equals `correct`; multi-token answers (many capitals) must be right in full."""
    if not prompts or not all(isinstance(p, Prompt) for p in prompts):
        raise TypeError("prompts must be a non-empty list of Prompt")
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        tokens = I.to_tokens(model, [p.text + p.answer for p in chunk])
        logits = model(tokens, attention_mask=I.attention_mask(model, tokens))
        pred = logits[:, :-1].argmax(-1).cpu()                   # prediction for the next column
        target = tokens[:, 1:].cpu()
        for i, p in enumerate(chunk):
            m = len(model.tokenizer.encode(p.answer, add_special_tokens=False))
            out.append(bool((pred[i, -m:] == target[i, -m:]).all()))
    return torch.tensor(out)
