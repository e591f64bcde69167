"""What one hidden state carries: future-lens probes (Pal et al. 2023, arXiv 2311.04897), learned soft-prompt
decoding of a transplanted hidden state, and the tuned lens (Belrose et al. 2023, arXiv 2303.08112).

    tokens, valid = generate_corpus(model, openings, n_new_tokens=48, seed=0)   # model-written text, fixed seed
    states = cache_states(model, tokens, valid)          # .resid [n_layers+1, n_pos, d_model], .top1, .seq, .pos
    src, tgt = future_pairs(states, n_ahead=1)           # hidden state at t -> the model's output at t+1
    W, b = fit_affine(states.resid[6, src], states.resid[-1, tgt], alpha=1e-3)
    acc = (top1(model, states.resid[6, src] @ W + b) == states.top1[tgt]).float().mean()

Layer L means the residual stream entering block L (L = n_layers: after the last block), as everywhere in the
workbook. Decoding a residual vector = the final norm then the unembedding (`helpers.interventions.unembed`).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from helpers import interventions as I
from helpers.probes import fit_affine


# ---------------------------------------------------------------------------------------------
# corpus and cached states
@torch.no_grad()
def generate_corpus(model, openings: Sequence[str], n_new_tokens: int = 48, seed: int = 0,
                    temperature: float = 0.8, top_k: int | None = 40) -> tuple[Tensor, Tensor]:
    """Sample continuations of `openings` from the model itself (seeded; the caller's RNG is left alone).

    Returns (tokens [n, T], valid [n, T] bool): valid marks real tokens up to and including the first
    end-of-sequence token; left padding and anything after an EOS are invalid."""
    if not openings or not all(isinstance(o, str) for o in openings):
        raise TypeError("openings must be a non-empty list of strings")
    if n_new_tokens < 1:
        raise ValueError("n_new_tokens must be >= 1")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokens = model.generate(list(openings), max_new_tokens=n_new_tokens, do_sample=True, temperature=temperature,
                                top_k=top_k, stop_at_eos=False, return_type="tokens", verbose=False,
                                padding_side="left")
    tokens = tokens.to("cpu")
    n_prompt = I.to_tokens(model, list(openings)).shape[1]
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    valid[:, :n_prompt] = I.attention_mask(model, tokens[:, :n_prompt]).bool().cpu()
    valid[:, n_prompt:] = True
    eos = model.tokenizer.eos_token_id
    if eos is not None:
        gen = tokens[:, n_prompt:] == eos
        after = (gen.cumsum(1) - gen.long()) > 0  # strictly after the first EOS
        valid[:, n_prompt:] &= ~after
    return tokens, valid


def load_corpus(path=None, key: str = "texts") -> list[str]:
    """The texts (or, key="openings", the openings) of data/future_lens_corpus.json (model-written with fixed
    seeds; see data/README.md)."""
    import json
    from pathlib import Path

    from helpers.env import DATA

    path = Path(path) if path is not None else DATA / "future_lens_corpus.json"
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {path}")
    return list(json.loads(path.read_text())[key])


def corpus_tokens(model, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Tokenize texts (BOS prepended, left-padded): (tokens [n, T], valid [n, T] bool, False on padding)."""
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a non-empty list of strings")
    tokens = I.to_tokens(model, list(texts)).cpu()
    return tokens, I.attention_mask(model, tokens).bool().cpu()


def generate_texts(model, openings: Sequence[str], n_new_tokens: int = 64, seed: int = 0, temperature: float = 0.8,
                   top_k: int | None = 40) -> list[str]:
    """`generate_corpus`, decoded back to plain text (special tokens dropped), one string per opening."""
    tokens, valid = generate_corpus(model, openings, n_new_tokens, seed, temperature, top_k)
    return [model.tokenizer.decode(t[v], skip_special_tokens=True).strip() for t, v in zip(tokens, valid)]


@dataclass
class States:
    """Residual streams at every layer for every valid non-BOS position of a corpus, flattened."""

    resid: Tensor      # [n_layers + 1, n_pos, d_model]
    top1: Tensor       # [n_pos] the model's own top-1 next-token prediction at each position
    token: Tensor      # [n_pos] the token at each position
    seq: Tensor        # [n_pos] which sequence
    pos: Tensor        # [n_pos] position inside its (padded) sequence

    @property
    def n_layers(self) -> int:
        return self.resid.shape[0] - 1

    def subset(self, index: Tensor) -> "States":
        return States(self.resid[:, index], self.top1[index], self.token[index], self.seq[index], self.pos[index])


@torch.no_grad()
def cache_states(model, tokens: Tensor, valid: Tensor, batch_size: int = 8) -> States:
    """Run the corpus once and keep the residual stream at every layer (0..n_layers) at every valid position
    except each sequence's first real token (BOS: an attention sink with huge activations). Sequences are
    batched by length and each batch is trimmed of all-padding columns, so little compute goes to padding."""
    if tokens.shape != valid.shape or tokens.ndim != 2:
        raise ValueError(f"tokens and valid must both be [n, T], got {tuple(tokens.shape)} and {tuple(valid.shape)}")
    names = [I.resid_name(model, layer) for layer in range(I.n_layers(model) + 1)]
    keep = valid.clone()
    first = valid.float().argmax(1)
    keep[torch.arange(len(keep)), first] = False
    order = torch.argsort(valid.sum(1), stable=True)
    per_row: dict[int, tuple[Tensor, Tensor]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        begin = int(valid[rows].any(0).float().argmax())            # left padding: drop all-padding columns
        tok, k = tokens[rows, begin:], keep[rows, begin:]
        logits, cache = I.run_with_cache(model, tok, names)
        stack = torch.stack([cache[n].float().cpu() for n in names])  # [L+1, b, T', d]
        top = logits.argmax(-1).cpu()
        for j, row in enumerate(rows.tolist()):
            per_row[row] = (stack[:, j, k[j]], top[j, k[j]])
    seq, pos = keep.nonzero(as_tuple=True)
    rows_in_order = range(tokens.shape[0])
    resid = torch.cat([per_row[r][0] for r in rows_in_order], dim=1)
    top1 = torch.cat([per_row[r][1] for r in rows_in_order])
    return States(resid, top1, tokens[keep], seq, pos)


def future_pairs(states: States, n_ahead: int, max_ahead: int | None = None) -> tuple[Tensor, Tensor]:
    """Flat indices (source t, target t + n_ahead) inside the same sequence. With `max_ahead`, only sources that
    have a target max_ahead ahead are kept, so every n_ahead <= max_ahead uses the same sources."""
    if n_ahead < 0:
        raise ValueError("n_ahead must be >= 0")
    horizon = n_ahead if max_ahead is None else max_ahead
    if horizon < n_ahead:
        raise ValueError("max_ahead must be >= n_ahead")
    lookup = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(states.seq, states.pos))}
    src, tgt = [], []
    for i, (s, p) in enumerate(zip(states.seq.tolist(), states.pos.tolist())):
        if (s, p + horizon) in lookup and all((s, p + d) in lookup for d in range(horizon + 1)):
            src.append(i)
            tgt.append(lookup[(s, p + n_ahead)])
    return torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long)


def split_by_sequence(states: States, test_fraction: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Boolean masks over positions (train, test), holding out whole sequences."""
    seqs = states.seq.unique()
    gen = torch.Generator().manual_seed(seed)
    shuffled = seqs[torch.randperm(len(seqs), generator=gen)]
    n_test = max(1, int(round(test_fraction * len(seqs))))
    test = torch.isin(states.seq, shuffled[:n_test])
    return ~test, test


def opening_groups(texts: Sequence[str], openings: Sequence[str]) -> Tensor:
    """For each text, the index of the opening it continues (the longest opening that is a prefix): [n_texts]
    long. Texts that share an opening are near-copies at the start, so they must sit on one side of a split."""
    out = []
    for text in texts:
        hits = [i for i, o in enumerate(openings) if text.startswith(o)]
        if not hits:
            raise ValueError(f"text {text[:40]!r} starts with none of the openings")
        out.append(max(hits, key=lambda i: len(openings[i])))
    return torch.tensor(out, dtype=torch.long)


def split_by_group(states: States, groups: Tensor, test_fraction: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Boolean masks over positions (train, test), holding out whole groups of sequences. `groups[s]` is the
    group of sequence s (e.g. `opening_groups`): every text of a held-out group is held out."""
    if groups.ndim != 1 or len(groups) <= int(states.seq.max()):
        raise ValueError(f"groups must give one id per sequence ({int(states.seq.max()) + 1}), got {tuple(groups.shape)}")
    ids = groups.unique()
    gen = torch.Generator().manual_seed(seed)
    shuffled = ids[torch.randperm(len(ids), generator=gen)]
    n_test = max(1, int(round(test_fraction * len(ids))))
    test = torch.isin(groups[states.seq], shuffled[:n_test])
    return ~test, test


# ---------------------------------------------------------------------------------------------
# linear maps
@torch.no_grad()
def decode(model, resid: Tensor, chunk: int = 512) -> Tensor:
    """Logits of residual vectors [n, d_model] read through the final norm and unembedding: [n, vocab]."""
    if resid.ndim != 2 or resid.shape[-1] != model.cfg.d_model:
        raise ValueError(f"resid must be [n, d_model={model.cfg.d_model}], got {tuple(resid.shape)}")
    dev = model.cfg.device
    return torch.cat([I.unembed(model, resid[s:s + chunk].to(dev)).float().cpu()
                      for s in range(0, len(resid), chunk)])


@torch.no_grad()
def top1(model, resid: Tensor, chunk: int = 512) -> Tensor:
    """Top-1 token of each decoded residual vector: [n]."""
    dev = model.cfg.device
    return torch.cat([I.unembed(model, resid[s:s + chunk].to(dev)).argmax(-1).cpu()
                      for s in range(0, len(resid), chunk)])


@torch.no_grad()
def kl_to_final(model, resid: Tensor, final_logits: Tensor, chunk: int = 512) -> Tensor:
    """KL(final output || decoded resid) per row, in nats: [n]. `final_logits` may be logits or log-probs."""
    if resid.shape[0] != final_logits.shape[0]:
        raise ValueError(f"{resid.shape[0]} residual rows but {final_logits.shape[0]} rows of final logits")
    dev = model.cfg.device
    out = [I.kl_divergence(final_logits[s:s + chunk].to(dev), I.unembed(model, resid[s:s + chunk].to(dev))).cpu()
           for s in range(0, len(resid), chunk)]
    return torch.cat(out)


def accuracy_gap(correct_a: Tensor, correct_b: Tensor, clusters: Sequence | Tensor | None = None) -> tuple[float, float]:
    """Mean of a minus mean of b for two 0/1 correctness vectors over the same items, and the standard error
    of that paired difference: (gap, se). With `clusters` (one label per item: the query, the text or its
    opening), the s.e. is clustered (`helpers.stats.clustered_se`): items of one cluster are not independent."""
    if correct_a.shape != correct_b.shape or correct_a.ndim != 1 or len(correct_a) < 2:
        raise ValueError("pass two 1-D correctness vectors of the same length (>= 2)")
    diff = correct_a.float() - correct_b.float()
    if clusters is None:
        return diff.mean().item(), (diff.std() / len(diff) ** 0.5).item()
    from helpers.stats import clustered_se

    labels = clusters.tolist() if isinstance(clusters, Tensor) else list(clusters)
    if len(labels) != len(diff):
        raise ValueError(f"{len(labels)} cluster labels for {len(diff)} items")
    return diff.mean().item(), clustered_se(diff.cpu().numpy(), labels)


# ---------------------------------------------------------------------------------------------
# n-gram baselines
def lookup_table(keys: Tensor, values: Tensor) -> dict[int, int]:
    """For each key token, the value token seen most often with it (ties: the smaller id). E.g. keys = the
    token at each training position, values = the model's top-1 prediction there: a bigram model of the model."""
    if keys.shape != values.shape or keys.ndim != 1:
        raise ValueError(f"keys and values must be 1-D and the same length, got {tuple(keys.shape)}, {tuple(values.shape)}")
    counts: dict[int, Counter] = defaultdict(Counter)
    for a, b in zip(keys.tolist(), values.tolist()):
        counts[a][b] += 1
    return {a: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for a, c in counts.items()}


def ngram_predict(table: dict[int, int], tokens: Tensor, fallback: int, steps: int = 1) -> Tensor:
    """Apply a `lookup_table` `steps` times to each token (unseen tokens map to `fallback`): [n].
    steps=0 returns the tokens themselves."""
    if steps < 0:
        raise ValueError("steps must be >= 0")
    out = [int(t) for t in tokens]
    for _ in range(steps):
        out = [table.get(t, fallback) for t in out]
    return torch.tensor(out, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# tuned lens
class TunedLens:
    """One affine translator per layer (h -> h @ W[l] + b[l]) before the final norm and unembedding.

    Identity translators give exactly the logit lens. Fit them in closed form (`fit`, least squares towards
    the final residual stream, shrunk to the identity) and/or train them on KL to the final output
    (`train_kl`, as Belrose et al. 2023)."""

    def __init__(self, W: Tensor, b: Tensor) -> None:
        if W.ndim != 3 or W.shape[1] != W.shape[2] or b.shape != (W.shape[0], W.shape[1]):
            raise ValueError(f"W must be [L, d, d] and b [L, d]; got {tuple(W.shape)}, {tuple(b.shape)}")
        self.W, self.b = W, b

    @classmethod
    def identity(cls, n_layers: int, d_model: int) -> "TunedLens":
        return cls(torch.eye(d_model).repeat(n_layers + 1, 1, 1), torch.zeros(n_layers + 1, d_model))

    @classmethod
    def fit(cls, resid: Tensor, alpha: float = 1e-3) -> "TunedLens":
        """resid [n_layers+1, n, d] from training positions; each layer's translator regresses the last layer."""
        Ws, bs = [], []
        for layer in range(resid.shape[0]):
            W, b = fit_affine(resid[layer], resid[-1], alpha=alpha, prior="identity")
            Ws.append(W)
            bs.append(b)
        return cls(torch.stack(Ws), torch.stack(bs))

    def translate(self, resid: Tensor, layer: int) -> Tensor:
        if not 0 <= layer < self.W.shape[0]:
            raise IndexError(f"layer {layer} out of range 0..{self.W.shape[0] - 1}")
        return resid @ self.W[layer] + self.b[layer]

    def train_kl(self, model, resid: Tensor, steps: int = 200, lr: float = 1e-3, batch_size: int = 64,
                 seed: int = 0, layers: Sequence[int] | None = None) -> list[float]:
        """Refine the translators by Adam on KL(final output || lens) over random training positions; returns the
        loss per step. `resid`: [n_layers+1, n, d] (the last row gives the targets)."""
        layers = list(range(resid.shape[0] - 1)) if layers is None else list(layers)
        dev = model.cfg.device
        W = self.W[layers].clone().to(dev).requires_grad_(True)
        b = self.b[layers].clone().to(dev).requires_grad_(True)
        opt = torch.optim.Adam([W, b], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        with frozen(model):
            for _ in range(steps):
                idx = torch.randint(resid.shape[1], (batch_size,), generator=gen)
                x = resid[layers][:, idx].to(dev)                        # [l, B, d]
                with torch.no_grad():
                    target = I.unembed(model, resid[-1, idx].to(dev)).log_softmax(-1)
                pred = I.unembed(model, torch.einsum("lbd,lde->lbe", x, W) + b[:, None]).log_softmax(-1)
                loss = (target.exp()[None] * (target[None] - pred)).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        self.W[layers] = W.detach().cpu()
        self.b[layers] = b.detach().cpu()
        return losses


@contextmanager
def frozen(model) -> Iterator[None]:
    """Turn off gradients for the model's weights inside the block (only the probe's parameters train)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# learned-prompt decoding (Pal et al. 2023, sec. 3.3)
def _embed(model, token_ids: Sequence[int]) -> Tensor:
    tokens = torch.tensor([list(token_ids)], device=model.cfg.device)
    return model.embed(tokens)[0].detach().float()


def init_soft_prompt(model, text: str = " Next:", n_prefix: int | None = None) -> Tensor:
    """Starting soft prompt: the token embeddings of `text` ([n_prefix, d_model]); cut or padded by repeating."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("init text has no tokens")
    if n_prefix is not None:
        ids = (ids * n_prefix)[:n_prefix]
    return _embed(model, ids).cpu()


def soft_prompt_logits(model, prefix: Tensor, sources: Tensor, layer: int, given: Tensor | None = None) -> Tensor:
    """Logits at a placeholder after [BOS, *prefix] whose residual stream entering `layer` is replaced by each
    source hidden state ([n, d_model]): the learned-prompt causal intervention of Pal et al.

    `given` ([n, m] token ids, optional): tokens fed after the placeholder (teacher forcing, as Pal et al. do for
    N >= 1: the true tokens t+1..t+m); the logits are then read after the last of them. All sources share one
    packed forward pass (each placeholder sees the prefix and its own tokens only). Differentiable in `prefix`."""
    from helpers.function_vectors import packed_inputs

    if prefix.ndim != 2 or prefix.shape[1] != model.cfg.d_model:
        raise ValueError(f"prefix must be [n_prefix, d_model], got {tuple(prefix.shape)}")
    if sources.ndim != 2 or sources.shape[1] != model.cfg.d_model:
        raise ValueError(f"sources must be [n, d_model], got {tuple(sources.shape)}")
    n, m = sources.shape[0], 0 if given is None else given.shape[1]
    if given is not None and (given.ndim != 2 or given.shape[0] != n):
        raise ValueError(f"given must be [n={n}, m] token ids, got {tuple(given.shape)}")
    layer = I.check_layer(model, layer, allow_final=True)
    dev = model.cfg.device
    bos = model.tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    prefix = prefix.to(dev)
    block = 1 + m
    dummy = torch.full((1, 1 + prefix.shape[0] + block), bos, device=dev)
    _, mask, positions = packed_inputs(dummy, n, block=block)
    slots = torch.zeros(n, block, prefix.shape[1], device=dev)
    if m:
        slots[:, 1:] = model.embed(given.to(dev)).float()
    embeds = torch.cat([_embed(model, [bos]).to(dev), prefix, slots.reshape(n * block, -1)])[None]
    start = 1 + prefix.shape[0]
    where = start + block * torch.arange(n, device=dev)
    src = sources.to(dev, embeds.dtype)

    def transplant(resid, hook):
        resid = resid.clone()
        resid[0, where] = src.to(resid.dtype)
        return resid

    logits = model.run_with_hooks(embeds, fwd_hooks=[(I.resid_name(model, layer), transplant)],
                                  attention_mask=mask, position_ids=positions)
    return logits[0, where + m].float()


def train_soft_prompt(model, sources: Tensor, targets: Tensor, layer: int, n_prefix: int = 4, steps: int = 40,
                      lr: float = 0.01, batch_size: int = 32, seed: int = 0, init_text: str = " Next:",
                      given: Tensor | None = None) -> tuple[Tensor, list[float]]:
    """Learn `n_prefix` prompt vectors so that the model, with a hidden state from `layer` transplanted after
    them (and the `given` tokens after that, if any), outputs the distribution the model itself produced N tokens
    later (targets: final-layer residual vectors [n, d_model] whose decoded distribution is the goal; loss = KL,
    as Pal et al.). Returns (prefix, losses)."""
    if sources.shape != targets.shape:
        raise ValueError(f"sources and targets must match, got {tuple(sources.shape)} and {tuple(targets.shape)}")
    dev = model.cfg.device
    prefix = init_soft_prompt(model, init_text, n_prefix).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([prefix], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with frozen(model), torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(len(sources), (min(batch_size, len(sources)),), generator=gen)
            with torch.no_grad():
                target = I.unembed(model, targets[idx].to(dev)).float().log_softmax(-1)
            pred = soft_prompt_logits(model, prefix, sources[idx], layer,
                                      None if given is None else given[idx]).log_softmax(-1)
            loss = (target.exp() * (target - pred)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return prefix.detach().cpu(), losses


@torch.no_grad()
def soft_prompt_top1(model, prefix: Tensor, sources: Tensor, layer: int, given: Tensor | None = None,
                     chunk: int = 128) -> Tensor:
    """Top-1 token the model outputs for each transplanted source state: [n]."""
    return torch.cat([soft_prompt_logits(model, prefix, sources[s:s + chunk], layer,
                                         None if given is None else given[s:s + chunk]).argmax(-1).cpu()
                      for s in range(0, len(sources), chunk)])
