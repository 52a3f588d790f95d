"""Chunked log-probs equal the full log-softmax, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax.logprobs import masked_mean_nll, token_logprobs


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_equals_full_log_softmax(chunk):
    rs = np.random.RandomState(0)
    h = jnp.asarray(rs.randn(3, 11, 16), jnp.float32)
    w = jnp.asarray(rs.randn(16, 50), jnp.float32)
    t = jnp.asarray(rs.randint(0, 50, (3, 11)))
    full = jnp.take_along_axis(jax.nn.log_softmax(h @ w, -1), t[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(h, w, t, chunk_size=chunk), full, atol=1e-5)

    mask = jnp.asarray(rs.rand(3, 11) > 0.3)
    f_ref = lambda h, w: masked_mean_nll(
        jnp.take_along_axis(jax.nn.log_softmax(h @ w, -1), t[..., None], -1)[..., 0], mask
    )[0]
    f_ours = lambda h, w: masked_mean_nll(token_logprobs(h, w, t, chunk_size=chunk), mask)[0]
    g_ref, g_ours = jax.grad(f_ref, (0, 1))(h, w), jax.jit(jax.grad(f_ours, (0, 1)))(h, w)
    for a, b in zip(g_ref, g_ours):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_masked_mean_of_empty_mask_is_zero():
    loss, count = masked_mean_nll(jnp.ones((2, 3)), jnp.zeros((2, 3)))
    assert float(loss) == 0.0 and float(count) == 0.0


def test_one_chunk_head_past_the_rows_where_jax_39103_miscompiles():
    """jax issue 39103: XLA:CPU in jaxlib 0.10.2 (our pin) returns wrong values for a jitted matmul followed by a
    reduction once the rows pass 2^14 (f64) / 2^15 (f32). Our head is such a pattern (logits, then log-sum-exp over
    the vocabulary) and runs as one chunk for a small vocabulary: every row agrees with a float64 reference."""
    n, D, V = 32769, 128, 104
    rs = np.random.RandomState(0)
    h = rs.randn(1, n, D).astype(np.float32)
    w = (rs.randn(D, V) / 8).astype(np.float32)
    t = rs.randint(0, V, (1, n))
    got = np.asarray(jax.jit(lambda a, b, c: token_logprobs(a, b, c, chunk_size=0))(h, w, t))[0]
    logits = h[0].astype(np.float64) @ w.astype(np.float64)
    top = logits.max(1)
    ref = logits[np.arange(n), t[0]] - (np.log(np.exp(logits - top[:, None]).sum(1)) + top)
    np.testing.assert_allclose(got, ref, atol=2e-5)
