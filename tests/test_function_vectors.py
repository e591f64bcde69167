"""Function vectors: prompt building, head outputs, packed patching and indirect effects, on known answers."""
import pytest
import torch

from helpers import function_vectors as FV
from helpers import interventions as I

PAIRS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("early", "late")]
PROMPT = "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: fast\nA:"


def test_icl_text_known_format():
    assert FV.icl_text(PAIRS[:2], "fast") == PROMPT
    assert FV.icl_text([], "fast", "arrow") == "fast ->"
    assert FV.zero_shot_prompts([("fast", "slow")], "The word '{x}' means")[0].text == "The word 'fast' means"


def test_shuffled_labels_move_every_label_and_keep_the_query_out():
    prompts = FV.icl_prompts(PAIRS, n_prompts=6, n_shots=4, seed=1, shuffle_labels=True)
    truth = dict(PAIRS)
    for p in prompts:
        blocks = p.text.split("\n\n")
        demos = [b.split("\nA: ") for b in blocks[:-1]]
        assert all(truth[x.removeprefix("Q: ")] != y for x, y in demos)   # every label moved
        assert all(x.removeprefix("Q: ") != p.query for x, _ in demos)  # the query is not a demonstration
        assert sorted(y for _, y in demos) == sorted(truth[x.removeprefix("Q: ")] for x, _ in demos)
        assert p.answer == " " + truth[p.query]


def test_load_tasks_split_is_disjoint_and_big_enough():
    tasks = FV.load_tasks()
    assert {"antonym", "country_capital", "english_french", "present_past", "lowercase_uppercase"} <= set(tasks)
    for task in tasks.values():
        assert len(task.pairs) >= 50
        assert not {x for x, _ in task.train} & {x for x, _ in task.test}
    with pytest.raises(KeyError, match="unknown tasks"):
        FV.load_tasks(["no_such_task"])


def test_head_outputs_plus_bias_equal_attn_out(model):
    layer = 7
    _, cache = I.run_with_cache(model, PROMPT, [I.hook_name(model, "z", layer), I.hook_name(model, "attn_out", layer)])
    z_all = torch.zeros(1, cache[I.hook_name(model, "z", layer)].shape[1], model.cfg.n_layers, model.cfg.n_heads,
                        model.cfg.d_head)
    z_all[:, :, layer] = cache[I.hook_name(model, "z", layer)]
    per_head = FV.head_outputs(model, z_all)[:, :, layer]                     # [1, pos, H, d_model]
    b_O = model.blocks[layer].attn.b_O
    total = per_head.sum(2) + (b_O.detach() if b_O is not None else 0)
    assert torch.allclose(total, cache[I.hook_name(model, "attn_out", layer)], atol=1e-4)


def test_packed_run_without_patches_is_the_plain_run(model):
    plain = I.logits(model, PROMPT)[0]
    packed = FV.patched_last_logits(model, PROMPT, [{}, {}, {}])
    for row in packed:
        assert torch.allclose(row, plain, atol=2e-3)


def test_patching_a_head_with_its_own_value_changes_nothing(model):
    _, z = FV.last_token_logits(model, [PROMPT], capture_z=True)
    own = z[0]                                                                 # [L, H, d_head]
    packed = FV.patched_last_logits(model, PROMPT, [{}, {(3, 1): own[3, 1]}, {(12, 4): own[12, 4], (20, 0): own[20, 0]}])
    assert torch.allclose(packed[1], packed[0], atol=1e-4) and torch.allclose(packed[2], packed[0], atol=1e-4)
    aie = FV.indirect_effects(model, [PROMPT], FV.answer_ids(model, [" slow"]), own, heads=[(0, 0), (5, 2), (29, 8)])
    assert aie[0, 5, 2].abs() < 1e-5 and torch.isnan(aie[0, 1, 1])


def test_packed_patch_equals_patching_the_full_prompt(model):
    value = torch.randn(model.cfg.d_head, generator=torch.Generator().manual_seed(0)) * 3
    name = I.hook_name(model, "z", 10)

    def hook(z, hook):
        z[:, -1, 2] = value
        return z
    tokens = I.to_tokens(model, PROMPT)
    reference = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])[0, -1]
    packed = FV.patched_last_logits(model, PROMPT, [{}, {(10, 2): value}])
    assert torch.allclose(packed[1], reference, atol=2e-3)
    assert not torch.allclose(packed[1], packed[0], atol=1e-2)


def test_function_vector_of_no_heads_is_zero_and_changes_nothing(model):
    mean_z = torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    fv = FV.function_vector(model, mean_z, [])
    assert torch.equal(fv, torch.zeros(model.cfg.d_model))
    prompts = ["Q: fast\nA:", "Q: up\nA:"]
    assert torch.allclose(FV.add_to_last(model, prompts, fv, 9), I.logits(model, prompts).float())
    one = FV.function_vector(model, mean_z, [(4, 2)])
    assert torch.allclose(one, mean_z[4, 2] @ model.blocks[4].attn.W_O[2].detach(), atol=1e-5)


def test_top_and_random_heads():
    scores = torch.zeros(4, 3)
    scores[2, 1], scores[0, 2] = 5.0, 3.0
    assert FV.top_heads(scores, 2) == [(2, 1), (0, 2)]
    heads = FV.random_heads(4, 3, 5, seed=0, exclude=[(2, 1)])
    assert len(set(heads)) == 5 and (2, 1) not in heads
    with pytest.raises(ValueError):
        FV.top_heads(torch.zeros(12), 2)


def test_bad_inputs_raise(model):
    with pytest.raises(IndexError, match="out of range"):
        FV.function_vector(model, torch.zeros(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head), [(30, 0)])
    with pytest.raises(KeyError, match="unknown template"):
        FV.icl_text(PAIRS, "fast", "nonsense")
    with pytest.raises(ValueError, match="must end in"):
        FV.head_outputs(model, torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="shots"):
        FV.icl_prompts(PAIRS, n_prompts=2, n_shots=10)


def test_correct_known_answers_and_zero_vector(model):
    prompts = [FV.Prompt("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
               FV.Prompt("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")]
    assert FV.correct(model, prompts).tolist() == [True, False]
    zero = torch.zeros(model.cfg.d_model)
    assert FV.correct(model, prompts, zero, layer=5).tolist() == [True, False]
    with pytest.raises(ValueError, match="layer"):
        FV.correct(model, prompts, zero)
    with pytest.raises(TypeError):
        FV.correct(model, ["a string, not a Prompt"])


def test_correct_by_task_equals_one_call_per_task(model):
    tasks = {"a": FV.zero_shot_prompts([("hot", "cold"), ("big", "small"), ("South Korea", "Seoul")]),
             "b": FV.zero_shot_prompts([("go", "went"), ("run", "ran")], "{x} ->")}
    gen = torch.Generator().manual_seed(0)
    vectors = {name: 20 * torch.randn(model.cfg.d_model, generator=gen) for name in tasks}
    together = FV.correct_by_task(model, tasks, vectors, layer=12, batch_size=4)   # batches straddle the tasks
    for name, prompts in tasks.items():
        logits = FV.add_to_last(model, FV.texts(prompts), vectors[name], 12)
        assert torch.equal(together[name], logits.argmax(-1) == FV.answer_ids(model, prompts))
    plain = FV.correct_by_task(model, tasks)
    assert {k: len(v) for k, v in plain.items()} == {"a": 3, "b": 2}
    with pytest.raises(KeyError, match="no vector"):
        FV.correct_by_task(model, tasks, {"a": vectors["a"]}, layer=12)
    with pytest.raises(ValueError, match="vectors for"):
        FV.add_to_last(model, ["Q: hot\nA:"], torch.zeros(2, model.cfg.d_model), 5)


def test_antonyms_are_unambiguous():
    pairs = FV.load_tasks(["antonym"])["antonym"].pairs
    outs = [y for _, y in pairs]
    assert len(set(outs)) == len(outs)                                   # no two words share an opposite


def test_top_share_and_permutation_null():
    consistent = torch.zeros(6, 4, 5)
    consistent[:, 1, 2] = 1.0                                             # one head matters in every prompt
    assert FV.top_share(consistent.mean(0), 1) == pytest.approx(1.0)
    null = FV.head_permutation_null(consistent, k=1, n_perm=50, seed=0)
    assert null.shape == (50,) and null.max() < 1.0                      # shuffled: the mass spreads over heads
    assert FV.top_share(torch.full((2, 2), -1.0), 1) == 0.0


def test_depth_null_and_reliability():
    depth = FV.random_depth_null(30, 9, 10, n_draws=500, seed=0)
    assert depth.shape == (500,) and 0.4 < depth.mean() < 0.56
    gen = torch.Generator().manual_seed(0)
    signal = torch.randn(1, 5, 6, generator=gen)
    assert FV.split_half_reliability(signal + 0.01 * torch.randn(8, 5, 6, generator=gen)) > 0.9
    assert abs(FV.split_half_reliability(torch.randn(8, 5, 6, generator=gen))) < 0.3


def test_norm_matched_random_and_decoding(model):
    v = torch.randn(model.cfg.d_model) * 3
    r = FV.norm_matched_random(v, seed=1)
    assert r.norm().item() == pytest.approx(v.norm().item(), rel=1e-5) and torch.cosine_similarity(r, v, 0).abs() < 0.3
    final = I.residual_stream(model, "The Eiffel Tower is located in the city of", pos=-1)[-1, 0]   # after the last block
    top = I.logits(model, "The Eiffel Tower is located in the city of")[0].argmax().item()
    assert FV.decode_top_tokens(model, final, k=3)[0] == model.tokenizer.decode([top])


def test_whole_answer_scoring(model):
    prompt = FV.Prompt("The Eiffel Tower is located in the city of", "x", " Paris")
    wrong = FV.Prompt("The Eiffel Tower is located in the city of", "x", " Paris Texas Ranger")
    hits = FV.whole_answer_correct(model, [prompt, wrong])
    assert hits.tolist() == [FV.correct(model, [prompt])[0].item(), False]


def test_resid_hooks_keep_the_last_position(model):
    hooks, store = FV.resid_hooks(model)
    FV.last_token_logits(model, ["Q: hot\nA:", "Q: a longer prompt\nA:"], fwd_hooks=hooks)
    resid = I.residual_stream(model, ["Q: hot\nA:", "Q: a longer prompt\nA:"], pos=-1)   # [L+1, batch, d]
    assert torch.allclose(torch.cat(store[5]), resid[5].float().cpu(), atol=1e-4)
