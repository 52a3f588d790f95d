"""Query-chunked attention on rows that are not a multiple of the block (the trainer's P + Lt + T rarely is): the
padded blocks must give exactly the dense result, forward and backward, also for a KV-cache prefill."""
import jax
import jax.numpy as jnp
import numpy as np

from ssft_jax import model as M

TOL = 2e-5


def _model():
    cfg = M.ModelConfig(model_type="qwen2", attention_bias=True, vocab_size=61, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return cfg, M.init_params(cfg, 3)


def test_chunked_attention_pads_rows_that_do_not_divide():
    cfg, params = _model()
    rs = np.random.RandomState(0)
    T = 30  # blocks of 8: 3 full blocks + 6 tokens
    tokens = jnp.asarray(rs.randint(0, cfg.vocab_size, (2, T)))
    seg = jnp.asarray(np.repeat([[1] * 11 + [2] * 9 + [3] * 7 + [0] * 3], 2, 0))
    prefix = jnp.asarray(np.repeat([[0] * 11 + [1] * 16 + [0] * 3], 2, 0))
    chunked_cfg = cfg.replace(attention_chunk=8)
    dense = M.forward(cfg, params, tokens, seg, prefix_segment_ids=prefix)
    chunked = jax.jit(lambda p: M.forward(chunked_cfg, p, tokens, seg, prefix_segment_ids=prefix))(params)
    assert chunked.shape == dense.shape
    np.testing.assert_allclose(chunked, dense, atol=TOL)
    g = lambda c: jax.grad(lambda p: M.forward(c, p, tokens, seg, prefix_segment_ids=prefix)[..., :5].sum())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g(chunked_cfg), g(cfg))


def test_chunked_prefill_into_a_cache_matches_dense():
    cfg, params = _model()
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 13)))
    outs = []
    for c in (cfg, cfg.replace(attention_chunk=4)):
        cache = M.init_cache(c, 1, 20)
        logits, cache = M.forward(c, params, tokens, cache=cache)
        nxt, _ = M.forward(c, params, tokens[:, :1], cache=cache)
        outs.append((np.asarray(logits), np.asarray(nxt)))
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=TOL)
    np.testing.assert_allclose(outs[1][1], outs[0][1], atol=TOL)
