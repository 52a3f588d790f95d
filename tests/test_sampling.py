"""Generation: cached greedy decoding equals re-running the full forward each step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import assembly, model as M
from ssft_jax.sampling import bucket_length, generate, sample_logits

CFG = M.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, attention_bias=True)


_full_forward = jax.jit(lambda p, t: M.forward(CFG, p, t))


def naive_greedy(params, prompt, n, width=48):
    """Re-run the whole (uncached) forward for every new token. Causal attention makes the right padding inert."""
    seq = list(prompt)
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, : len(seq)] = seq
        logits = _full_forward(params, jnp.asarray(row))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_cached_greedy_equals_uncached_token_for_token():
    params = M.init_params(CFG, seed=3)
    params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, params)  # sharper logits: fewer near-ties
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [4] * 20]
    outs = generate(CFG, params, prompts, max_new_tokens=12, eos_token_ids=[49], temperature=0.0)
    for p, o in zip(prompts, outs):
        ref = naive_greedy(params, p, 12)
        cut = next((i + 1 for i, t in enumerate(ref) if t == 49), 12)
        assert o == ref[:cut]


def test_stops_at_eos_and_keeps_it():
    params = M.init_params(CFG, seed=0)
    ref = naive_greedy(params, [1, 2, 3], 6)
    eos = ref[2]
    out = generate(CFG, params, [[1, 2, 3]], max_new_tokens=6, eos_token_ids=[eos])[0]
    assert out[-1] == eos and len(out) == ref.index(eos) + 1


def test_sample_logits_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    rng = jax.random.key(0)
    top1 = sample_logits(logits, rng, 1.0, top_k=1, top_p=1.0)
    assert set(np.asarray(top1).tolist()) == {0}
    nucleus = np.asarray(sample_logits(logits, rng, 1.0, top_k=0, top_p=0.75))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.75 needs token 1 too; 0.8 >= 0.75 stops there
    free = np.asarray(sample_logits(logits, rng, 1.0, top_k=0, top_p=1.0))
    assert abs((free == 0).mean() - 0.5) < 0.05
    limited = np.asarray(sample_logits(logits, rng, 0.0, 0, 1.0, vocab_limit=0 + 1))
    assert set(limited.tolist()) == {0}
    padded = np.asarray(sample_logits(jnp.asarray([[0.0, 0.0, 9.0]]), rng, 0.0, 0, 1.0, vocab_limit=2))
    assert padded[0] != 2


def test_bucket_length_bounds_compiles():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
    with pytest.raises(ValueError, match="at least one token"):
        generate(CFG, M.init_params(CFG), [[]], max_new_tokens=2, eos_token_ids=[0])


# ------------------------------------------------------------------------------------------------------------------
# Questions x tags x samples with a shared prompt cache
# ------------------------------------------------------------------------------------------------------------------

from ssft_jax import sampling  # noqa: E402

TAGS = [[40, 41], [42], [43, 44, 45], []]  # different lengths, one empty: per-row suffix offsets


def _sharp_params(seed):
    params = M.init_params(CFG, seed=seed)
    return jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, params)


def test_shared_prefix_greedy_equals_per_row_uncached_and_unshared():
    params = _sharp_params(5)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [4] * 17]  # 17 > 16: a second prompt bucket than the others
    n = 10
    shared = sampling.generate_forked(CFG, params, prompts, TAGS, num_samples=2, max_new_tokens=n,
                                      eos_token_ids=[49], temperature=0.0)
    unshared = sampling.generate_forked(CFG, params, prompts, TAGS, num_samples=2, max_new_tokens=n,
                                        eos_token_ids=[49], temperature=0.0, share_prefix=False)
    assert len(shared) == 3 and all(len(q) == len(TAGS) and all(len(t) == 2 for t in q) for q in shared)
    for b, p in enumerate(prompts):
        for t, tag in enumerate(TAGS):
            ref = naive_greedy(params, p + tag, n)
            cut = next((i + 1 for i, x in enumerate(ref) if x == 49), n)
            for s in range(2):
                assert shared[b][t][s].tokens == ref[:cut], (b, t, s)
                assert unshared[b][t][s].tokens == ref[:cut], (b, t, s)
                assert shared[b][t][s].finished == (49 in ref[:cut])
    # the tags do change the continuation (otherwise the test above would not exercise the per-row suffixes)
    assert len({tuple(shared[0][t][0].tokens) for t in range(len(TAGS))}) > 1


def test_shared_prefix_sampling_top_k1_is_greedy_and_seeded():
    params = _sharp_params(6)
    prompts = [[3, 1, 4, 1, 5], [2, 7]]
    greedy = sampling.generate_forked(CFG, params, prompts, TAGS, num_samples=3, max_new_tokens=6,
                                      eos_token_ids=[49], temperature=0.0)
    top1 = sampling.generate_forked(CFG, params, prompts, TAGS, num_samples=3, max_new_tokens=6,
                                    eos_token_ids=[49], temperature=1.0, top_k=1, seed=3)
    assert [[[g.tokens for g in t] for t in q] for q in greedy] == [[[g.tokens for g in t] for t in q] for q in top1]
    raw = M.init_params(CFG, seed=6)  # soft logits: samples differ across rows and seeds
    a = sampling.generate_forked(CFG, raw, prompts, TAGS, num_samples=4, max_new_tokens=8, eos_token_ids=[49],
                                 temperature=1.0, seed=1)
    b = sampling.generate_forked(CFG, raw, prompts, TAGS, num_samples=4, max_new_tokens=8, eos_token_ids=[49],
                                 temperature=1.0, seed=1)
    c = sampling.generate_forked(CFG, raw, prompts, TAGS, num_samples=4, max_new_tokens=8, eos_token_ids=[49],
                                 temperature=1.0, seed=2)
    toks = lambda o: [[[g.tokens for g in t] for t in q] for q in o]  # noqa: E731
    assert toks(a) == toks(b) and toks(a) != toks(c)
    assert len({tuple(g.tokens) for g in a[0][0]}) > 1  # the 4 samples of one (question, tag) are not copies


def test_padded_vocab_ids_are_never_sampled():
    params = M.init_params(CFG, seed=1)
    # Make the padded tail (ids >= 45) by far the most likely tokens, then forbid them.
    params = dict(params, lm_head=params["lm_head"].at[:, 45:].add(5.0))
    free = sampling.generate_forked(CFG, params, [[1, 2, 3]], TAGS, num_samples=4, max_new_tokens=8,
                                    eos_token_ids=[0], temperature=1.0, seed=0)
    assert any(x >= 45 for q in free for t in q for g in t for x in g.tokens)
    limited = sampling.generate_forked(CFG, params, [[1, 2, 3]], TAGS, num_samples=4, max_new_tokens=8,
                                       eos_token_ids=[0], temperature=1.0, top_p=0.9, seed=0, vocab_limit=45)
    assert all(x < 45 for q in limited for t in q for g in t for x in g.tokens)


def test_stop_token_set_and_bounded_compiles():
    params = M.init_params(CFG, seed=0)
    ref = naive_greedy(params, [5, 6, 7], 8)
    stops = [ref[3], ref[5]]  # whichever comes first ends the row
    out = generate(CFG, params, [[5, 6, 7]], max_new_tokens=8, eos_token_ids=stops)[0]
    assert out == ref[: min(ref.index(s) for s in stops) + 1]
    before = sampling._generate_core._cache_size()
    for prompts in ([[1] * 3, [2] * 9], [[3] * 16, [4]], [[5] * 11, [6] * 2]):  # all in the 16-token bucket
        sampling.generate_forked(CFG, params, prompts, TAGS, num_samples=1, max_new_tokens=4, eos_token_ids=[49])
    assert sampling._generate_core._cache_size() - before <= 1


def test_load_hf_folder_for_generation(tmp_path):
    from ssft_jax import hf_io, tokenization
    tok = tokenization.build_char_tokenizer(tmp_path / "tok")
    tags = tokenization.ForkingTags(n=3, mode="special")
    _, n_vocab = tags.add_to_tokenizer(tok)
    cfg = M.ModelConfig(vocab_size=n_vocab + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    params = M.init_params(cfg, seed=0)
    hf_io.save_hf_folder(tmp_path / "hf", cfg, params, tokenizer=tok, eos_token_ids=tokenization.eos_token_ids(tok))
    lm = assembly.load_for_generation(hf_dir=tmp_path / "hf")
    assert lm.tags.n == 3 and lm.tags.mode == "special" and lm.vocab_limit == n_vocab
    assert lm.cfg.attention_bias is False
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="exactly one"):
        assembly.load_for_generation()


def test_radix_select_masks_equal_sorting_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.choice(np.linspace(-4, 4, 13), size=(16, 300)).astype(np.float32)  # many ties
    logits[0, :] = -np.inf
    logits[0, 7] = 1.0  # one finite value among -inf
    logits[1, 100:] = -np.inf
    for k in (1, 3, 40, 299, 300):
        kth = -np.sort(-logits, axis=-1)[:, k - 1: k]
        np.testing.assert_array_equal(np.asarray(sampling.top_k_mask(jnp.asarray(logits), k)), logits >= kth)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
    for p in (0.05, 0.3, 0.5, 0.9, 0.99):
        order = np.argsort(-probs, axis=-1, kind="stable")
        sp = np.take_along_axis(probs, order, -1)
        last = (np.cumsum(sp, -1) - sp < p).sum(-1) - 1  # reference: the sort-based nucleus
        cutoff = np.take_along_axis(sp, last[:, None], -1)
        got = np.asarray(sampling.top_p_mask(jnp.asarray(probs, jnp.float32), p))
        np.testing.assert_array_equal(got, probs >= cutoff)
