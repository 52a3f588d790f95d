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
    f_ref = lambda h, w: masked_mean_nll(jnp.take_along_axis(jax.nn.log_softmax(h @ w, -1), t[..., None], -1)[..., 0], mask)[0]
    f_ours = lambda h, w: masked_mean_nll(token_logprobs(h, w, t, chunk_size=chunk), mask)[0]
    g_ref, g_ours = jax.grad(f_ref, (0, 1))(h, w), jax.jit(jax.grad(f_ours, (0, 1)))(h, w)
    for a, b in zip(g_ref, g_ours):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_masked_mean_of_empty_mask_is_zero():
    loss, count = masked_mean_nll(jnp.ones((2, 3)), jnp.zeros((2, 3)))
    assert float(loss) == 0.0 and float(count) == 0.0
