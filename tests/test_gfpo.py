"""GFPO: the policy over the forking tags, the loss terms, the estimators' gradients, and the stage's run guarantees
(resume, non-finite rewards, config and data errors)."""
import json
import logging
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import config as config_lib, evaluate, gfpo, metrics_log, model as M, tag_policy, tokenization as T, train
from ssft_jax.data import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# The policy reads the N tag probabilities
# ---------------------------------------------------------------------------------------------------------------

def _model_for(tok, seed=0):
    cfg = M.ModelConfig(vocab_size=len(tok) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    params = M.init_params(cfg, seed=seed)
    return cfg, jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)  # sharper: tags differ visibly


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    return T.build_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("mode", ["special", "text"])
def test_policy_equals_a_direct_forward_over_the_tag_tokens(char_tok, mode):
    tok = char_tok
    tags = T.ForkingTags.for_tokenizer(tok, 5, mode)
    if mode == "special":
        tags.add_to_tokenizer(tok)
    cfg, params = _model_for(tok)
    choice = tag_policy.TagChoice.for_tags(tok, tags)
    ids = tags.all_tag_ids(tok)
    if mode == "text":  # <|im_start|><think + digit + >\n: the prefix is shared, the digit is the choice
        assert len(choice.prefix_ids) > 0 and all(i[: len(choice.prefix_ids)] == list(choice.prefix_ids) for i in ids)
    else:
        assert choice.prefix_ids == () and [list(t) for t in choice.tag_ids] == ids
    prompts = [list(T.render_example(tok, q, None, tags, None).prompt_ids) for q in ("What is 2+3?", "Sum 17 and 5")]
    valid = np.array([True, True, False, True, True])
    got = tag_policy.TagPolicy(cfg, params, choice, valid, batch=4).log_probs(prompts)
    for b, p in enumerate(prompts):
        row = jnp.asarray([p + list(choice.prefix_ids)])
        logits = np.asarray(M.forward(cfg, params, row)[0, -1], np.float64)  # unpadded, whole head
        # p(tag i) = p(its first differing token | prompt + shared prefix), renormalised over the valid tags
        z = np.array([logits[c] for c in choice.choice_ids])
        ref = np.exp(z - z[valid].max()) * valid
        ref /= ref.sum()
        np.testing.assert_allclose(np.exp(got[b]), ref, atol=2e-6)
        assert np.exp(got[b])[2] == 0.0  # an invalid tag has probability exactly 0


def test_text_tags_without_a_single_choice_token_are_refused():
    with pytest.raises(tag_policy.TagPolicyError, match="do not differ in one token"):
        tag_policy.TagChoice.from_tag_ids([[5, 1, 9], [5, 1, 9, 0]])  # <think1> vs <think10> under a digit tokenizer


def test_the_gradient_flows_only_through_the_tag_position(char_tok):
    """The update's forward is the prompt alone. A reference loss computed from the whole rollout row (prompt, tag,
    generated answer) at the tag position has the same value and gradient, whatever the generated tokens are."""
    tok = char_tok
    tags = T.ForkingTags.for_tokenizer(tok, 4, "text")
    cfg, params = _model_for(tok, seed=1)
    choice = tag_policy.TagChoice.for_tags(tok, tags)
    prompt = list(T.render_example(tok, "What is 4+4?", None, tags, None).prompt_ids)
    tag, adv = 2, 0.7
    valid = jnp.ones(4, bool)
    choice_ids = jnp.asarray(choice.choice_ids)
    tokens, lengths = tag_policy.policy_rows([prompt], choice.prefix_ids, 64)

    def prompt_only(p):
        lp = tag_policy.tag_log_probs(cfg, p, jnp.asarray(tokens), jnp.asarray(lengths), choice_ids, valid)
        return -adv * lp[0, tag]

    def full_row(p, generated):
        row = jnp.asarray([prompt + list(choice.tag_ids[tag]) + generated])
        logits = M.forward(cfg, p, row)[0, len(prompt) + len(choice.prefix_ids) - 1]
        return -adv * jax.nn.log_softmax(logits[choice_ids])[tag]

    v0, g0 = jax.value_and_grad(prompt_only)(params)
    rng = np.random.default_rng(0)
    grads = []
    for _ in range(2):
        generated = rng.integers(3, len(tok), size=20).tolist()
        v, g = jax.value_and_grad(full_row)(params, generated)
        np.testing.assert_allclose(v, v0, rtol=1e-5)
        grads.append(g)
    for a, b, c in zip(jax.tree.leaves(g0), *map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(b, c, atol=0)  # a different answer: the very same gradient
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)  # the same math, rounded in another order
    assert float(jnp.abs(jax.tree.leaves(g0)[0]).sum()) > 0  # and there is a gradient


# ---------------------------------------------------------------------------------------------------------------
# Loss terms against hand-computed numbers
# ---------------------------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = jnp.asarray([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    a = np.asarray(tag_policy.group_advantages(r, eps=0.0 + 1e-12))
    np.testing.assert_allclose(a[0], [1, -1, -1, 1], atol=1e-6)  # mean 0.5, std 0.5
    np.testing.assert_allclose(a[1], 0.0)  # equal rewards teach nothing
    np.testing.assert_allclose(a[2], np.array([2.25, -0.75, -0.75, -0.75]) / math.sqrt(1.6875), atol=1e-6)
    np.testing.assert_allclose(tag_policy.group_advantages(r, normalize_std=False)[2], [2.25, -.75, -.75, -.75])


def test_clipped_surrogate_by_hand():
    # rows: ratio 1.5 with A=+1 (clipped to 1.2), ratio 0.5 with A=-1 (clipped to 0.8: -0.8), ratio 1.1 A=+2
    logp_old = jnp.log(jnp.asarray([[0.2, 0.4, 0.5]]))
    logp = jnp.log(jnp.asarray([[0.3, 0.2, 0.55]]))
    adv = jnp.asarray([[1.0, -1.0, 2.0]])
    w = jnp.asarray([[0.5, 0.25, 0.25]])
    obj, clipfrac = tag_policy.clipped_surrogate(logp, logp_old, adv, w, 0.2)
    np.testing.assert_allclose(obj, [0.5 * 1.2 + 0.25 * -0.8 + 0.25 * 2.2], rtol=1e-5)
    np.testing.assert_allclose(clipfrac, [0.75], rtol=1e-6)
    # at ratio 1 the gradient is sum_r w_r A_r grad log pi(tag_r)
    g = jax.grad(lambda lp: tag_policy.clipped_surrogate(lp, logp_old, adv, w, 0.2)[0].sum())(logp_old)
    np.testing.assert_allclose(g, w * adv, rtol=1e-6)


def test_enumerate_advantages_and_weights_by_hand():
    valid = jnp.asarray([[True, True, False]])
    p_old = jnp.asarray([[0.25, 0.75, 0.0]])
    row_tags = jnp.asarray([[0, 0, 1, 1]])  # k=2 rollouts per valid tag
    rewards = jnp.asarray([[1.0, 0.0, 1.0, 1.0]])  # rbar = (0.5, 1.0); baseline 0.25*0.5 + 0.75*1 = 0.875
    adv, w = gfpo.advantages_and_weights("enumerate", rewards, row_tags, jnp.log(p_old), valid, samples_per_tag=2,
                                         eps=1e-6, normalize_std=True)
    np.testing.assert_allclose(adv, [[-0.375, -0.375, 0.125, 0.125]], atol=1e-6)
    np.testing.assert_allclose(w, [[0.125, 0.125, 0.375, 0.375]], atol=1e-6)
    adv, w = gfpo.advantages_and_weights("grpo", rewards, row_tags, jnp.log(p_old), valid, samples_per_tag=1,
                                         eps=1e-6, normalize_std=False)
    np.testing.assert_allclose(adv, [[0.25, -0.75, 0.25, 0.25]], atol=1e-6)
    np.testing.assert_allclose(w, 0.25)


def test_exact_kl_and_entropy_against_brute_force():
    rng = np.random.default_rng(3)
    valid = np.array([[True, False, True, True, True], [True, True, True, True, False]])
    lg, lr = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    logp = tag_policy.masked_log_softmax(jnp.asarray(lg), jnp.asarray(valid))
    logq = tag_policy.masked_log_softmax(jnp.asarray(lr), jnp.asarray(valid))
    for b in range(2):
        v = valid[b]
        p = np.exp(lg[b][v]) / np.exp(lg[b][v]).sum()
        q = np.exp(lr[b][v]) / np.exp(lr[b][v]).sum()
        np.testing.assert_allclose(tag_policy.exact_kl(logp, logq, jnp.asarray(valid))[b], np.sum(p * np.log(p / q)),
                                   rtol=1e-5)
        np.testing.assert_allclose(tag_policy.entropy(logp, jnp.asarray(valid))[b], -np.sum(p * np.log(p)), rtol=1e-5)
    assert float(tag_policy.exact_kl(logp, logp, jnp.asarray(valid)).max()) == 0.0


def test_enumerate_is_the_exact_gradient_of_the_expected_reward(char_tok):
    """grad of the enumerate surrogate (at ratio 1) == finite differences of J = sum_i pi_i rbar_i on a model."""
    tok = char_tok
    tags = T.ForkingTags.for_tokenizer(tok, 4, "special")
    tags.add_to_tokenizer(tok)
    cfg, params = _model_for(tok, seed=2)
    choice = tag_policy.TagChoice.for_tags(tok, tags)
    prompts = [list(T.render_example(tok, q, None, tags, None).prompt_ids) for q in ("1+1?", "what is 9+3?")]
    tokens, lengths = (jnp.asarray(x) for x in tag_policy.policy_rows(prompts, (), 32))
    valid = jnp.asarray([[True, True, True, False]] * 2)
    choice_ids = jnp.asarray(choice.choice_ids)
    rbar = jnp.asarray([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 1.0, 0.0]])
    k = 2
    row_tags = jnp.asarray([[0, 0, 1, 1, 2, 2]] * 2)
    rewards = jnp.take_along_axis(rbar, row_tags, -1)

    def logp_of(p):
        return tag_policy.tag_log_probs(cfg, p, tokens, lengths, choice_ids, valid)

    logp_old = jax.lax.stop_gradient(logp_of(params))
    adv, w = gfpo.advantages_and_weights("enumerate", rewards, row_tags, logp_old, valid, samples_per_tag=k, eps=0.0,
                                         normalize_std=True)

    def surrogate(p):
        sel = jnp.take_along_axis(logp_of(p), row_tags, -1)
        return tag_policy.clipped_surrogate(sel, jnp.take_along_axis(logp_old, row_tags, -1), adv, w, 0.2)[0].sum()

    def expected_reward(p):
        return jnp.sum(jnp.exp(logp_of(p)) * rbar)

    g = jax.grad(surrogate)(params)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    direction = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves])
    directional = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
    eps = 3e-4  # small: the sharpened model is far from linear at 1e-2 along a random direction
    shift = lambda s: jax.tree.map(lambda x, d: x + s * eps * d, params, direction)
    fd = (float(expected_reward(shift(1))) - float(expected_reward(shift(-1)))) / (2 * eps)
    assert abs(directional) > 1e-2
    np.testing.assert_allclose(directional, fd, rtol=2e-2)
    # and leaf by leaf against autodiff of J itself
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(jax.grad(expected_reward)(params))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_draw_row_tags_follows_the_policy_and_never_an_invalid_tag():
    p = np.array([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0]])
    valid = np.array([True, False, True, True])
    tags = gfpo.draw_row_tags("grpo", p, valid, group_size=20000, samples_per_tag=1, rng=np.random.default_rng(0))
    assert tags.shape == (2, 20000) and not np.isin(tags, [1]).any()
    np.testing.assert_allclose(np.bincount(tags[0], minlength=4) / 20000, p[0], atol=0.015)
    assert (tags[1] == 2).all()
    e = gfpo.draw_row_tags("enumerate", p, valid, group_size=0, samples_per_tag=2, rng=None)
    assert e.tolist() == [[0, 0, 2, 2, 3, 3]] * 2


def test_tag_choice_metrics_by_hand():
    # 2 questions, 3 tags (tag 2 invalid), one sample each
    gens = [dict(question_index=q, tag=t, correct=c) for q, t, c in
            [(0, 0, 1), (0, 1, 0), (0, 2, 1), (1, 0, 0), (1, 1, 1), (1, 2, 1)]]
    log_pi = {0: np.log([0.2, 0.8, 1e-3]), 1: np.log([0.6, 0.4, 0.5])}
    m = evaluate.tag_choice_metrics(gens, log_pi, [True, True, False])
    assert m["self_chosen_greedy"] == 0.0  # q0 picks tag 1 (wrong), q1 picks tag 0 (wrong)
    np.testing.assert_allclose(m["self_chosen_sampled"], (0.2 + 0.4) / 2)
    assert m["best_fixed_tag"] == {"tag": 0, "value": 0.5, "chosen_on": "these questions"} and m["oracle"] == 1.0
    assert m["greedy_tag_counts"] == [1, 1, 0]


def test_the_best_fixed_tag_is_chosen_on_validation_questions_and_scored_on_the_others():
    # test questions 0, 1: tag 1 is right on both; validation question 5: only tag 0 is right, so tag 0 is chosen
    # (a best-of-N chosen on the test questions themselves would pick tag 1 and score 1.0)
    test = [dict(question_index=q, tag=t, correct=c) for q, t, c in
            [(0, 0, 0), (0, 1, 1), (0, 2, 1), (1, 0, 1), (1, 1, 1), (1, 2, 1)]]
    val = [dict(question_index=5, tag=t, correct=c) for t, c in [(0, 1), (1, 0), (2, 1)]]
    log_pi = {0: np.log([0.2, 0.8, 1e-3]), 1: np.log([0.6, 0.4, 0.5])}
    m = evaluate.tag_choice_metrics(test, log_pi, [True, True, False], select_on=val)
    assert m["best_fixed_tag"] == {"tag": 0, "value": 0.5, "chosen_on": "validation (1 other questions)"}
    assert m["best_fixed_tag_in_hindsight"] == {"tag": 1, "value": 1.0}
    assert m["self_chosen_greedy"] == 1.0 and m["oracle"] == 1.0  # on the test questions only
    with pytest.raises(ValueError, match="lacks generations"):
        evaluate.tag_choice_metrics(test, log_pi, [True, True, True], select_on=val[:2])


def test_validation_split_is_by_id_hash_whatever_the_order():
    ids = [f"q{i}" for i in range(30)]
    held = {ids[i] for i in evaluate.validation_split(ids, 1 / 3)}
    assert len(held) == 10
    rev = ids[::-1]
    assert {rev[i] for i in evaluate.validation_split(rev, 10)} == held
    with pytest.raises(ValueError, match="no test questions"):
        evaluate.validation_split(ids, 30)


# ---------------------------------------------------------------------------------------------------------------
# The stage: config, data, resume, non-finite rewards
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ssft_workdir(tiny_ssft_run):
    """A tiny SSFT run to start from (the demo config's 'tiny' variant; conftest's shared run, read only)."""
    return tiny_ssft_run[0]


def _gfpo_config(init, **gfpo_overrides):
    c = config_lib.load_config("gfpo_demo", "tiny")
    c.mesh.update(num_devices=1, data=1)
    c.export_hf = False
    c.gfpo.init_from = str(init)
    c.gfpo.update(**gfpo_overrides)
    return c


def test_config_errors_name_the_field(ssft_workdir, tmp_path):
    with pytest.raises(config_lib.ConfigError, match="group_size=1"):
        gfpo.run(_gfpo_config(ssft_workdir, group_size=1), tmp_path / "a", progress=False)
    with pytest.raises(config_lib.ConfigError, match="valid_tags='7'"):
        gfpo.run(_gfpo_config(ssft_workdir, valid_tags="7"), tmp_path / "b", progress=False)
    with pytest.raises(config_lib.ConfigError, match="gfpo.estimator='ppo'"):
        gfpo.run(_gfpo_config(ssft_workdir, estimator="ppo"), tmp_path / "c", progress=False)
    with pytest.raises(config_lib.ConfigError, match="init_from is empty"):
        gfpo.run(_gfpo_config(""), tmp_path / "d", progress=False)
    with pytest.raises(config_lib.ConfigError, match="neither a training workdir"):
        gfpo.run(_gfpo_config(tmp_path), tmp_path / "e", progress=False)
    with pytest.raises(config_lib.ConfigError, match="HF folder"):  # it does not say which questions SSFT saw
        gfpo.run(_gfpo_config(ssft_workdir / "hf_export"), tmp_path / "f", progress=False)
    ssft_config = config_lib.load_config("demo", "tiny")
    with pytest.raises(config_lib.ConfigError, match="not a GFPO config"):
        gfpo.run(ssft_config, tmp_path / "g", progress=False)
    with pytest.raises(config_lib.ConfigError, match="ssft_jax.gfpo"):
        train.run(_gfpo_config(ssft_workdir), tmp_path / "h", progress=False)


def test_bad_records_are_named_or_counted(char_tok):
    tags = T.ForkingTags.for_tokenizer(char_tok, 2, "text")
    recs = [{"id": "ok", "question": "1+1?", "answer": "2"}, {"id": "no-answer", "question": "2+2?"},
            {"id": "long", "question": "9" * 200, "answer": "9"}]
    with pytest.raises(DataError, match="'no-answer'.*no 'answer'"):
        gfpo.Questions(recs, char_tok, tags, max_prompt_len=64)
    q = gfpo.Questions(recs, char_tok, tags, max_prompt_len=64, on_bad_record="skip")
    assert len(q) == 1 and sum(q.skipped.values()) == 2
    # the per-step order: every question once per epoch, a function of (seed, step) only
    q = gfpo.Questions([{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(10)], char_tok, tags,
                       max_prompt_len=64)
    first_epoch = np.concatenate([q.indices(s, 5, seed=3) for s in (0, 1)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    np.testing.assert_array_equal(q.indices(3, 5, seed=3), q.indices(3, 5, seed=3))


def _final_params(workdir):
    from ssft_jax import assembly
    return assembly.load_checkpoint_for_generation(workdir).params


@pytest.mark.parametrize("estimator", ["grpo", "enumerate"])
def test_resume_is_bit_exact(ssft_workdir, tmp_path, estimator):
    over = dict(estimator=estimator, samples_per_tag=1)
    # The tiny model solves nothing (every reward 0, no gradient): a reward read from the text itself gives signal
    # and stays a function of the rollout, as a resumed run needs.
    reward = lambda record, text, result: float(len(text) % 3 == 0)
    straight = gfpo.run(_gfpo_config(ssft_workdir, **over), tmp_path / "straight", progress=False, reward_fn=reward)
    first = gfpo.run(_gfpo_config(ssft_workdir, **over), tmp_path / "resumed", progress=False, stop_after=2,
                     reward_fn=reward)
    assert first["stopped_early"] and first["final_step"] == 2
    second = gfpo.run(_gfpo_config(ssft_workdir, **over), tmp_path / "resumed", progress=False, reward_fn=reward)
    assert second["start_step"] == 2 and second["final_step"] == 3 and straight["compiles"] == 1
    # the whole run's rewards, not only the last process's share
    assert second["rewards"] == straight["rewards"] and sorted(second["rewards"]) == [1, 2, 3]
    per_process = ("start_step", "seconds", "compiles", "rollout_seconds", "update_seconds")
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("resumed", "straight")]
    assert [{k: v for k, v in s.items() if k not in per_process} for s in summaries] == \
        [{k: v for k, v in summaries[1].items() if k not in per_process}] * 2
    for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "straight")),
                    jax.tree.leaves(_final_params(tmp_path / "resumed"))):
        np.testing.assert_array_equal(a, b)
    # the weights moved (the update is not a no-op), and every record of the straight run was logged
    init = jax.tree.leaves(_final_params(ssft_workdir))
    assert any(not np.array_equal(a, b) for a, b in zip(init, jax.tree.leaves(_final_params(tmp_path / "straight"))))
    recs = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert {"reward", "entropy", "kl_to_init", "pi_mean", "rollout_tag_counts", "rollout_tokens_per_s"} <= set(recs[0])
    assert sum(recs[0]["rollout_tag_counts"]) == 4 * (3 if estimator == "grpo" else 6)


def test_a_nan_reward_is_skipped_and_counted(ssft_workdir, tmp_path):
    calls = {"n": 0}

    def reward(record, text, result):  # step 2's rollouts (the 13th..24th calls) get NaN
        calls["n"] += 1
        return float("nan") if 12 < calls["n"] <= 24 else float(result.correct) + 0.5 * (calls["n"] % 2)

    s = gfpo.run(_gfpo_config(ssft_workdir), tmp_path / "nan", progress=False, reward_fn=reward)
    recs = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_skipped"] for r in recs] == [0, 1, 0] and s["steps_skipped"] == 1
    assert recs[1]["rewards_nonfinite"] == 12 and recs[2]["steps_skipped_total"] == 1
    c = _gfpo_config(ssft_workdir)
    c.max_consecutive_skips = 1
    with pytest.raises(train.TrainingDivergedError, match="2 consecutive steps"):
        gfpo.run(c, tmp_path / "diverged", progress=False, reward_fn=lambda *a: float("nan"))


def test_gfpo_from_an_hf_folder_on_two_devices_then_evaluate(ssft_workdir, tmp_path):
    c = _gfpo_config(ssft_workdir / "hf_export", data="config", num_steps=1)
    c.mesh.update(num_devices=2, data=2)
    c.data.update(name="synthetic", max_prompt_len=40, max_trace_len=72)
    c.data.synthetic.update(num_questions=16, heldout=4, difficulty="tiny")
    c.ssft.update(num_tags=6, tag_mode="special", cost_prefix_len=12)
    c.export_hf = True
    s = gfpo.run(c, tmp_path / "g", progress=False)
    assert s["final_step"] == 1 and (tmp_path / "g" / "hf_export" / "config.json").is_file()
    out = tmp_path / "eval"
    assert evaluate.main(["--workdir", str(tmp_path / "g"), "--num_questions", "4", "--max_new_tokens", "16",
                          "--no_plots", "--out", str(out)]) == 0
    tc = json.loads((out / "metrics.json").read_text())["metrics"]["tag_choice"]
    assert 0.0 <= tc["self_chosen_greedy"] <= tc["oracle"] <= 1.0 and len(tc["policy_mean"]) == 6


def test_rewards_without_a_learning_signal_are_warned_about_and_plotted(ssft_workdir, tmp_path, caplog):
    """All-0 rewards (a checker that never says right) give GRPO no signal: each such step is marked in
    metrics.jsonl and a warning says why and what to check; the run's curves show reward, entropy, KL and pi."""
    assert gfpo.has_learning_signal(np.array([[0.0, 0.0], [1.0, 0.0]]))
    assert not gfpo.has_learning_signal(np.array([[1.0, 1.0], [0.0, np.nan]]))
    with caplog.at_level(logging.WARNING):
        gfpo.run(_gfpo_config(ssft_workdir), tmp_path / "zero", progress=False, reward_fn=lambda *a: 0.0)
    recs = [json.loads(x) for x in (tmp_path / "zero" / "metrics.jsonl").read_text().splitlines()]
    assert [r["no_signal"] for r in recs] == [1, 1, 1]
    warned = [r.getMessage() for r in caplog.records if "no learning signal" in r.getMessage()]
    assert len(warned) == 1 and "check the checker" in warned[0]
    png = metrics_log.plot_training_curves(tmp_path / "zero", tmp_path / "curves.png")
    assert png.stat().st_size > 20_000
    keys = set().union(*recs)
    assert {"reward", "entropy", "kl_to_init", "pi_mean"} <= keys


# ---------------------------------------------------------------------------------------------------------------
# GFPO from a LoRA SSFT run: the adapters (and special tags' rows) move, the base does not
# ---------------------------------------------------------------------------------------------------------------

def test_gfpo_from_a_lora_run_moves_only_the_adapters_and_exports_merged(tmp_path):
    from ssft_jax import assembly, hf_io, lora

    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.lora.update(enabled=True, rank=4, alpha=8.0, base_dtype="float32")
    c.optim.update(learning_rate=1e-2, warmup_frac=0.0)
    c.num_steps, c.export_hf = 2, False
    train.run(c, tmp_path / "ssft", progress=False)
    before = assembly.load_checkpoint_for_generation(tmp_path / "ssft", merge_lora=False)
    assert set(before.params) == {"lora", "tag_embedding"}

    g = _gfpo_config(tmp_path / "ssft", num_steps=2)
    g.gfpo.optim.learning_rate = 1e-2
    g.export_hf = True
    # a reward that differs between rollouts of this barely trained model: every step has a learning signal
    s = gfpo.run(g, tmp_path / "gfpo", progress=False, reward_fn=lambda rec, text, res: float(len(text) % 2))
    assert s["trained"] == "lora adapters" and s["compiles"] == 1 and s["final_step"] == 2
    spec, frozen, params = s["lora"], s["frozen"], s["state"]["params"]
    assert set(params) == {"lora", "tag_embedding"}  # the train state (and checkpoint) holds the adapters only
    # the base is bit-identical to the SSFT run's; the adapters and the tag rows moved
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), params, before.params)
    assert moved["lora"]["q_proj"]["a"] > 0 and moved["tag_embedding"] > 0

    cfg = s["model_config"]
    toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 15)))
    toks = toks.at[:, 4].set(spec.tag_token_ids[1])
    adapted = M.forward(cfg, lora.adapted_params(cfg, spec, frozen, params), toks)
    cfg2, exported = hf_io.load_hf_params(s["export_dir"])
    assert float(jnp.abs(M.forward(cfg2, exported, toks) - adapted).max()) <= 1e-5
    spec2, back = lora.load_peft_adapter(tmp_path / "gfpo" / "lora_adapter", cfg)
    assert spec2.rank == spec.rank
    np.testing.assert_allclose(np.asarray(back["lora"]["q_proj"]["a"]), np.asarray(params["lora"]["q_proj"]["a"]),
                               atol=1e-6)
    # the GFPO run's checkpoint resumes as a LoRA run too (adapters-only state, the base re-read)
    again = gfpo.run(g, tmp_path / "gfpo", progress=False)
    assert again["start_step"] == again["final_step"] == 2


# ---------------------------------------------------------------------------------------------------------------
# The paper's RL data shape: prompts with a verifiable answer, no traces
# ---------------------------------------------------------------------------------------------------------------

def test_prompt_only_rows_load_from_jsonl_parquet_and_datasets_folders(char_tok, tmp_path):
    import datasets as hf_datasets

    from ssft_jax.data.formats import read_source
    tags = T.ForkingTags.for_tokenizer(char_tok, 2, "text")
    rows = [{"prompt": [{"role": "user", "content": "2+3?"}], "reward_model": {"ground_truth": "5"}},  # DAPO-17k
            {"question": "1+1?", "answer": "2"},
            {"messages": [{"role": "user", "content": "3+3?"}], "answer": 6},
            {"prompt": "4+4?", "answer": "8"}]
    jsonl = tmp_path / "rl.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flat = [{"prompt": "2+3?", "answer": "5"}, {"prompt": "1+1?", "answer": "2"}]
    hf_datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "rl.parquet"))
    hf_datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "rl_folder"))
    q = gfpo.Questions(read_source(jsonl), char_tok, tags, max_prompt_len=64)
    assert len(q) == 4 and [r["answer"] for r in q.records] == ["5", "2", 6, "8"]
    for src in ("rl.parquet", "rl_folder"):
        q = gfpo.Questions(read_source(tmp_path / src), char_tok, tags, max_prompt_len=64)
        assert [r["answer"] for r in q.records] == ["5", "2"]
    # bad rows are named by file:line, or counted when skipping
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n" + json.dumps({"prompt": "no answer"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2\): no 'answer'"):
        gfpo.Questions(read_source(bad), char_tok, tags, max_prompt_len=64)
    bad.write_text(json.dumps(rows[1]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2\): broken_json"):
        gfpo.Questions(read_source(bad), char_tok, tags, max_prompt_len=64)
    bad.write_text(json.dumps(rows[1]) + "\n" + json.dumps({"answer": "1"}) + "\n{not json\n")
    q = gfpo.Questions(read_source(bad), char_tok, tags, max_prompt_len=64, on_bad_record="skip")
    assert len(q) == 1 and sum(q.skipped.values()) == 2


def test_gfpo_runs_on_a_prompts_file(ssft_workdir, tmp_path):
    # the SSFT run's own questions written as prompt-only rows: what a user's RL prompt set looks like
    from ssft_jax import datasets
    c = _gfpo_config(ssft_workdir, num_steps=1)
    init = config_lib.from_saved(json.loads((ssft_workdir / "config.json").read_text()))
    records, _ = datasets.build_records(init)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["question"], "answer": r["answer"]}) + "\n"
                               for r in records[:8]))
    c.gfpo.update(data=str(prompts), checker="synthetic")
    s = gfpo.run(c, tmp_path / "run", progress=False)
    assert s["questions"] == 8 and s["final_step"] == 1
    c.gfpo.checker = "nope"
    with pytest.raises(config_lib.ConfigError, match="gfpo.checker='nope'"):
        gfpo.run(c, tmp_path / "run2", progress=False)


def test_replicated_rollout_weights_decode_the_same_tokens_without_fsdp_sharding(ssft_workdir, tmp_path):
    # On an FSDP mesh (fsdp=4): the decoding copy is split over nothing but 'tensor', and with float32 compute it
    # samples exactly what the training layout samples.
    runs = {}
    for how in ("train", "replicated"):
        c = _gfpo_config(ssft_workdir, num_steps=2, rollout_weights=how)
        c.mesh.update(num_devices=4, data=1, fsdp=4, tensor=1)
        runs[how] = gfpo.run(c, tmp_path / how, progress=False)
        runs[how]["metrics"] = [r for r in metrics_log.read_metrics(tmp_path / how) if "reward" in r]
    for a, b in zip(runs["train"]["metrics"], runs["replicated"]["metrics"]):
        assert a["rollout_tokens"] == b["rollout_tokens"] and a["rollout_tag_counts"] == b["rollout_tag_counts"]
        assert a["reward"] == b["reward"]
    params = runs["replicated"]["state"]["params"]
    assert "fsdp" in str(params["layers"]["q_proj"].sharding.spec)  # the trained weights stay FSDP-sharded
    copy = gfpo.make_decoding_copy(params, "bfloat16")(params)
    assert copy["layers"]["q_proj"].dtype == jnp.bfloat16 and copy["layers"]["attn_norm"].dtype == jnp.float32
    assert "fsdp" not in str(copy["layers"]["q_proj"].sharding.spec)
    assert len(copy["layers"]["q_proj"].sharding.device_set) == 4
