"""Known-answer tests of helpers.steering (notebook 08)."""
import numpy as np
import pytest
import torch

from helpers import interventions as I
from helpers import steering as S

OCEAN = ["ocean", "sea", "wave", "beach"]


def test_harmonic_mean_known_values():
    assert S.harmonic_mean(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert S.harmonic_mean(np.array([0.5, 1.0, 1.0])) == pytest.approx(3 / (2 + 1 + 1))
    cols = np.array([[1.0, 0.2], [0.5, 0.0], [0.25, 0.4]])          # three scores (rows) for two items (columns)
    np.testing.assert_allclose(S.harmonic_mean(cols), [3 / (1 + 2 + 4), 0.0])
    with pytest.raises(ValueError):
        S.harmonic_mean(np.array([0.5, -0.1, 1.0]))


def test_lexicon_hits_on_hand_written_text():
    text = "The Sea was calm; waves hit the beaches. Seasons change, the seaside too."
    assert S.lexicon_hits(text, OCEAN) == 3                    # Sea, waves, beaches (not Seasons, seaside)
    assert S.concept_score(text, OCEAN) == 1.0
    assert S.concept_score("One wave.", OCEAN) == 0.5
    assert S.concept_score("Nothing here.", OCEAN) == 0.0
    assert S.lexicon_hits("Je pense que c'est la vie et le reste.", ["le", "la", "c'est", "et"]) == 4
    with pytest.raises(ValueError):
        S.lexicon_hits("text", [])


def test_repetition_rate_known_values():
    assert S.repetition_rate("a b c d") == 0.0
    assert S.repetition_rate("a b a b a b") == pytest.approx(1 - 2 / 5)   # bigrams ab ba ab ba ab: 2 distinct of 5
    assert S.repetition_rate("word") == 0.0


def test_fluency_and_relevance_scores():
    np.testing.assert_allclose(S.fluency_score(np.array([10.0, 20.0, np.inf]), 10.0, np.array([0.0, 0.5, 0.0])),
                               [1.0, 0.25, 0.0])
    np.testing.assert_allclose(S.relevance_score(np.array([-2.0, -1.0]), np.array([-1.0, -2.0])), [np.exp(-1.0), 1.0])


def test_step_share():
    assert S.step_share([0, 1, 2, 3]) == pytest.approx(1 / 3)
    assert S.step_share([0, 0, 1, 1]) == pytest.approx(1.0)
    assert S.step_share([0, 2, 1]) == pytest.approx(1.0)       # rises to its maximum in one step, then falls
    with pytest.raises(ValueError):
        S.step_share([1, 0])


def test_chat_prompt_strips_bos_and_plain_fallback(model):
    p = S.chat_prompt(model.tokenizer, "Hi?", "Be brief.")
    assert not p.startswith(model.tokenizer.bos_token) and "Be brief." in p and p.rstrip().endswith("assistant")
    assert I.to_tokens(model, p)[0, 1].item() != model.tokenizer.bos_token_id      # one BOS, the bridge's

    class Plain:
        chat_template = None
    assert S.chat_prompt(Plain(), "Hi?", "Sys", [("Q1", "A1")]) == "Sys\nQ: Q1\nA: A1\nQ: Hi?\nA:"


def test_batched_steering_sweep_equals_per_point_runs(model):
    """One batch with a different vector per row (a coefficient sweep) gives each row's own steered run."""
    prompts = ["The weather today is", "My favourite animal is"]
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 10
    coefs = [0.0, 1.0, 3.0]
    rows = [(p, c) for c in coefs for p in prompts]
    steer = {6: torch.stack([c * v for _, c in rows])}
    texts = S.generate(model, [p for p, _ in rows], steer, n_new=4)
    lp, cm = S.answer_scores(model, [p for p, _ in rows], [" sunny"] * len(rows), steer, concept_ids=[5, 7])
    for r, (p, c) in enumerate(rows):
        one = {6: (c * v)[None]}
        assert texts[r] == S.generate(model, [p], one, n_new=4)[0]
        lp1, cm1 = S.answer_scores(model, [p], [" sunny"], one, concept_ids=[5, 7])
        assert lp[r] == pytest.approx(lp1[0], abs=1e-3) and cm[r] == pytest.approx(cm1[0], abs=1e-3)
    assert texts[0] == S.generate(model, [prompts[0]], None, n_new=4)[0]          # a zero row is unsteered
    assert texts[len(prompts) * 2] != texts[0]                                     # a large coefficient changes it
    with pytest.raises(ValueError, match="one vector per row"):
        S.generate(model, prompts, {6: v[None]}, n_new=2)


def test_answer_scores_known_logprob(model):
    """The mean log-prob of a one-token answer equals the log-softmax of the prompt's last logits."""
    prompt, answer = "The Eiffel Tower is located in the city of", " Paris"
    lp, cm = S.answer_scores(model, [prompt], [answer], concept_ids=[I.token_id(model, answer)])
    expected = I.logits(model, prompt)[0].float().log_softmax(-1)[I.token_id(model, answer)].item()
    assert lp[0] == pytest.approx(expected, abs=1e-4) and cm[0] == pytest.approx(expected, abs=1e-4)


def test_perplexity_of_empty_text_is_infinite(model):
    ppl = S.perplexity(model, ["The cat sat on the mat.", ""])
    assert np.isfinite(ppl[0]) and ppl[0] > 1 and np.isinf(ppl[1])


def test_perplexity_skip_leaves_out_the_first_token(model):
    """skip=1 scores the tokens after the first one: the same as the text's tail after its first token."""
    ids = model.tokenizer.encode(" cat sat on the mat.", add_special_tokens=False)
    head = model.tokenizer.decode(model.tokenizer.encode("The", add_special_tokens=False))
    lp, _ = S.answer_scores(model, [head], [model.tokenizer.decode(ids)])
    ppl = S.perplexity(model, ["The cat sat on the mat.", "The cat sat on the mat.", ""], skip=1)
    assert ppl[0] == pytest.approx(np.exp(-lp[0]), rel=1e-4) and np.isinf(ppl[2])
    assert S.perplexity(model, ["The cat sat on the mat."])[0] != pytest.approx(ppl[0], rel=1e-3)
    with pytest.raises(ValueError):
        S.perplexity(model, ["x"], skip=-1)


def test_conditional_perplexity_scores_only_the_continuation(model):
    prompt, text = "The Eiffel Tower is located in the city of", "Paris"
    lp, _ = S.answer_scores(model, [prompt], [text])
    ppl = S.conditional_perplexity(model, [prompt, prompt], [text, "  "])
    assert ppl[0] == pytest.approx(np.exp(-lp[0]), rel=1e-5) and np.isinf(ppl[1])
    with pytest.raises(ValueError):
        S.conditional_perplexity(model, [prompt], [text, text])


def test_text_means_is_the_mean_over_tokens_after_bos(model):
    texts = ["A short one.", "A somewhat longer sentence than the first."]
    m = S.text_means(model, texts, [3])
    alone = I.residual_stream(model, texts[1], layers=[3], pos=None)[0, 0, 1:].mean(0)
    assert torch.allclose(m[0, 1], alone, atol=1e-3)


def test_load_concepts_has_disjoint_fit_and_question_texts():
    d = S.load_concepts()
    assert {"ocean", "french"} <= set(d["concepts"])
    for c in d["concepts"].values():
        assert len(c["positive"]) == 24 and c["lexicon"] and len(c["fewshot"]) == 2
    asked = {q["question"] for q in d["questions"]}
    assert not asked & {q for c in d["concepts"].values() for q, _ in c["fewshot"]}
