"""Generation: cached greedy decoding equals re-running the full forward each step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import model as M
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
