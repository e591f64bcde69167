"""Known-answer tests of helpers.patching on a tiny random TransformerLens model (and the offline model for tokens)."""
import pytest
import torch

from helpers import patching as P

SEQ = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 3-block llama (d_model 16) with the offline model's tokenizer, loaded as the notebooks load models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import helpers

    tok = helpers.load_model(verbose=False).tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return helpers.load_model(str(folder), device="cpu", verbose=False)


def linear_toy():
    """A one-block toy whose logits are linear in hook_mlp_out and hook_resid_post (no final norm)."""
    from types import SimpleNamespace

    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Toy(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.cfg = SimpleNamespace(n_layers=1, n_ctx=16, d_model=8, device="cpu")
            g = torch.Generator().manual_seed(0)
            for n, s in zip(("E", "V", "W1", "W2", "U"), [(40, 8), (8, 8), (8, 8), (8, 8), (8, 40)]):
                setattr(self, n, torch.nn.Parameter(torch.randn(*s, generator=g) / 3))
            self.hook_embed = HookPoint()
            self.blocks = torch.nn.ModuleList([torch.nn.Module()])
            for n in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"):
                setattr(self.blocks[0], n, HookPoint())
            self.setup()

        def forward(self, tokens):
            b = self.blocks[0]
            r = b.hook_resid_pre(self.hook_embed(self.E[tokens]))
            causal = torch.tril(torch.ones(r.shape[1], r.shape[1])) / torch.arange(1, r.shape[1] + 1)[:, None]
            mid = r + b.hook_attn_out(causal @ r @ self.V)
            post = b.hook_resid_post(mid + b.hook_mlp_out(torch.tanh(mid @ self.W1) @ self.W2))
            return post @ self.U

    return Toy().eval()


@pytest.fixture(scope="module")
def setup(tiny):
    torch.manual_seed(0)
    model = tiny
    tokens = torch.randint(0, 40, (1, SEQ))
    cols = (1, 3)
    noise = P.gaussian_noise(2.0, 3, cols, 16, torch.Generator().manual_seed(1))
    names = [P.site_name(model, k, L) for k in P.KINDS for L in range(3)]
    sources = {"clean": P.cache(model, tokens, names), "corrupt": P.cache(model, tokens, names, noise, cols)}
    return model, tokens, cols, noise, sources


def test_clean_into_clean_is_clean(setup):
    model, tokens, cols, noise, sources = setup
    p_clean = model(tokens)[0, -1].log_softmax(-1)[5].item()   # log-probs: a random model's p is ~1/vocab
    rest = P.grid(model, "resid", range(3), range(SEQ)) + P.grid(model, "mlp_out", range(3), range(SEQ), window=2)
    out = P.run_grid(model, tokens, 5, rest, {"clean": sources["clean"]}, metric="logprob")
    assert out.shape == (len(rest), 1)
    torch.testing.assert_close(out, torch.full_like(out, p_clean), atol=1e-6, rtol=0)


def test_corrupted_into_corrupted_is_zero_effect(setup):
    model, tokens, cols, noise, sources = setup
    rest = P.grid(model, "resid", range(3), range(SEQ), source="corrupt")
    out = P.run_grid(model, tokens, 5, rest, sources, noise, cols, metric="logprob")
    base = P.run_grid(model, tokens, 5, [()], sources, noise, cols, batch_size=3, metric="logprob")
    torch.testing.assert_close(out, base.expand_as(out), atol=1e-6, rtol=0)


def test_restoring_every_column_of_a_layer_is_the_clean_run(setup):
    model, tokens, cols, noise, sources = setup
    p_clean = model(tokens)[0, -1].log_softmax(-1)[5].item()   # log-probs: a random model's p is ~1/vocab
    every = [tuple(p for c in range(SEQ) for p in P.grid(model, "resid", [L], [c])[0]) for L in range(3)]
    out = P.run_grid(model, tokens, 5, every, sources, noise, cols, metric="logprob")
    torch.testing.assert_close(out, torch.full_like(out, p_clean), atol=1e-5, rtol=0)
    base = P.run_grid(model, tokens, 5, [()], sources, noise, cols, batch_size=3, metric="logprob")
    assert (base - p_clean).abs().max() > 1e-4          # the noise did change the output


def test_batched_grid_equals_per_site_loop(setup):
    model, tokens, cols, noise, sources = setup
    rest = P.grid(model, "resid", range(3), range(SEQ)) + P.grid(model, "resid", [0, 1], [1, 2], sever=True)
    batched = P.run_grid(model, tokens, 5, rest, sources, noise, cols, batch_size=30, metric="logprob")
    loop = torch.cat([P.run_grid(model, tokens, 5, [r], sources, noise, cols, batch_size=3, metric="logprob") for r in rest])
    torch.testing.assert_close(batched, loop, atol=1e-6, rtol=1e-5)
    tr = P.causal_trace(model, tokens, 5, cols, rest, noise, metric="logprob")
    torch.testing.assert_close(tr.effect, (loop - tr.corrupted).mean(1), atol=1e-6, rtol=1e-5)


def test_severed_equals_manual_two_patches(setup):
    model, tokens, cols, noise, sources = setup
    sev = P.grid(model, "resid", [0], [2], sever=True)[0]
    assert [p.name for p in sev] == ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]
    assert [p.source for p in sev] == ["clean", "corrupt", "corrupt"]
    assert P.grid(model, "resid", [0], [2], sever="mlp_out") == [sev]
    (att,) = P.grid(model, "resid", [0], [2], sever="attn_out")
    assert [p.name for p in att] == ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.2.hook_attn_out"]


def test_window_matches_rome(tiny):
    model = tiny
    (w,) = P.grid(model, "mlp_out", [1], [4], window=2)
    assert [p.name for p in w] == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    (w,) = P.grid(model, "attn_out", [2], [4], window=10)
    assert [p.name for p in w] == [f"blocks.{l}.hook_attn_out" for l in range(3)]


def test_attribution_is_exact_when_the_metric_is_linear_in_the_activation():
    model = linear_toy()
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (1, SEQ))
    cols = (1, 3)
    noise = P.gaussian_noise(2.0, 2, cols, 8, torch.Generator().manual_seed(1))
    names = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.0.hook_attn_out"]
    clean = P.cache(model, tokens, names)
    srcs = {"clean": clean, "corrupt": P.cache(model, tokens, names, noise, cols)}
    est = P.attribution(model, tokens, 5, names, clean, noise, cols, metric="logit")
    base = P.run_grid(model, tokens, 5, [()], srcs, noise, cols, metric="logit", batch_size=2)
    for n in names[:2]:   # the logit is linear in the block's output and its MLP output at the last column
        exact = P.run_grid(model, tokens, 5, [(P.Patch(n, SEQ - 1),)], srcs, noise, cols, metric="logit", batch_size=2)
        torch.testing.assert_close(est[n][SEQ - 1], (exact - base).mean(), atol=1e-4, rtol=1e-4)
        assert est[n][:SEQ - 1].abs().max() == 0      # earlier columns of the last block never reach the logit
    exact = P.run_grid(model, tokens, 5, [(P.Patch(names[2], SEQ - 1),)], srcs, noise, cols, metric="logit", batch_size=2)
    assert (est[names[2]][SEQ - 1] - (exact - base).mean()).abs() > 1e-4   # through the tanh MLP: only approximate


def test_aligned_positions_and_group_means():
    g = P.aligned_positions(2, 5, 10)
    assert g == {"first subject": [2], "middle subject": [3], "last subject": [4], "first after": [5],
                 "further": [6, 7, 8], "last": [9]}
    assert P.representative_cols(g) == [2, 3, 4, 5, 7, 9]
    vals = torch.arange(10.0)[None]
    m = P.group_means(vals, g, list(range(10)))
    torch.testing.assert_close(m[0], torch.tensor([2.0, 3.0, 4.0, 5.0, 7.0, 9.0]))
    one = P.aligned_positions(1, 2, 4)
    assert one["first subject"] == one["last subject"] == [1] and one["middle subject"] == []
    assert torch.isnan(P.group_means(torch.zeros(1, 1), one, [1])[0, 1])
    with pytest.raises(ValueError):
        P.aligned_positions(2, 10, 10)


def test_bad_input_raises(setup):
    model, tokens, cols, noise, sources = setup
    with pytest.raises(ValueError):
        P.grid(model, "mlp_out", [0], [1], sever=True)
    with pytest.raises(ValueError):
        P.grid(model, "resid", [0], [1], sever="mlp")
    with pytest.raises(ValueError):
        P.site_name(model, "mlp", 0)
    with pytest.raises(KeyError):
        P.run_grid(model, tokens, 5, [(P.Patch("blocks.0.hook_mlp_out", 1, "other"),)], sources, noise, cols)
    with pytest.raises(ValueError):
        P.run_grid(model, tokens, 5, [()], sources, noise, cols, batch_size=0)
    with pytest.raises(ValueError):   # 2 noise samples, 3 corrupted-run variants
        P.run_grid(model, tokens, 5, [()], sources, noise[:2], cols)
    with pytest.raises(ValueError):
        P.gaussian_noise(0.0, 2, cols, 16)


def test_subject_cols_on_the_offline_model(model):
    prompt = "The Colosseum is located in the city of"
    toks = model.to_tokens(prompt)[0]
    start, end = P.subject_cols(model, prompt, "Colosseum")
    assert model.tokenizer.decode(toks[start:end]).strip() == "Colosseum"
    assert model.tokenizer.decode(toks[start - 1:start]) == "The"
    with pytest.raises(ValueError):
        P.subject_cols(model, prompt, "Eiffel")


def test_subject_embedding_std_and_trace_maps(tiny):
    prompt = "The Colosseum is located in the city of"
    toks = tiny.to_tokens(prompt)
    cols = P.subject_cols(tiny, prompt, "Colosseum")
    emb = P.cache(tiny, toks, ["hook_embed"])["hook_embed"][0, cols[0]:cols[1]]
    assert P.subject_embedding_std(tiny, [prompt], ["Colosseum"]) == pytest.approx(emb.std().item(), rel=1e-6)
    noise = P.gaussian_noise(1.0, 2, cols, 16, torch.Generator().manual_seed(0))
    pos = [cols[0], cols[1] - 1, toks.shape[1] - 1]
    tr, maps = P.trace_maps(tiny, toks, 5, cols, [0, 2], pos, noise, window=3, metric="logprob")
    assert set(maps) == set(P.MAP_KINDS) and all(m.shape == (2, 3) for m in maps.values())
    alone = P.causal_trace(tiny, toks, 5, cols, P.grid(tiny, "resid", [0, 2], pos), noise, metric="logprob")
    torch.testing.assert_close(maps["resid"].flatten(), alone.effect, atol=1e-6, rtol=1e-5)
    # block 2 is the last: nothing above it to sever, so severed = plain restoration there
    torch.testing.assert_close(maps["severed"][1], maps["resid"][1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps["attn_severed"][1], maps["resid"][1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps["resid"][1, 2], alone.clean - alone.corrupted.mean(), atol=1e-5, rtol=1e-5)
    p = P.split_maps(tr.as_prob(), P.MAP_KINDS, 2, 3)     # the same sweep in probabilities
    prob = P.causal_trace(tiny, toks, 5, cols, P.grid(tiny, "resid", [0, 2], pos), noise, metric="prob")
    torch.testing.assert_close(p["resid"].flatten(), prob.effect, atol=1e-9, rtol=1e-4)
    with pytest.raises(ValueError):
        P.Trace(0.0, torch.zeros(1), torch.zeros(1, 1), "logit").as_prob()
