"""Per-token log-probabilities without materialising [B, T, V] logits.

With a 152k vocabulary and 32k-token rows, full logits would be ~20 GB per row in fp32. We scan over chunks of
tokens; each chunk computes its [chunk, V] logits, a log-sum-exp and the target logit, then drops them. The chunk
body is rematerialised in the backward pass, so training memory for the head is one chunk's logits, not the row's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# chunk_size <= 0 computes the head in one chunk when its fp32 logits fit in this many bytes (a small vocabulary).
AUTO_ONE_CHUNK_BYTES = 64 << 20


def token_logprobs(hidden: jax.Array, w_out: jax.Array, targets: jax.Array, *, chunk_size: int = 1024) -> jax.Array:
    """log p(targets[b, t] | hidden[b, t]) in fp32, shape [B, T].

    hidden: [B, T, D] final hidden states; w_out: [D, V] output projection; targets: [B, T] int (any value where
    unused: mask the result). chunk_size tokens (over the flattened B*T) are processed at a time.
    """
    B, T, D = hidden.shape
    n = B * T
    if chunk_size <= 0:  # auto: the whole head at once when its logits are small (a char vocabulary), else 1024
        chunk_size = n if n * w_out.shape[-1] * 4 <= AUTO_ONE_CHUNK_BYTES else 1024
    chunk = max(1, min(chunk_size, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden.reshape(n, D), ((0, pad), (0, 0))).reshape(n_chunks, chunk, D)
    tgt = jnp.pad(targets.reshape(n), (0, pad)).reshape(n_chunks, chunk)
    w = w_out.astype(hidden.dtype)

    @jax.checkpoint  # recompute the chunk's logits in the backward pass instead of storing them
    def one_chunk(h_c, t_c):
        logits = jnp.einsum("cd,dv->cv", h_c, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return picked - lse

    if n_chunks == 1:  # no scan around a single chunk: XLA fuses the head with what follows
        return one_chunk(h[0], tgt[0])[:n].reshape(B, T)
    _, out = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None, (h, tgt))
    return out.reshape(-1)[:n].reshape(B, T)


def masked_mean_nll(logp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token-mean negative log-likelihood over mask and the token count (0-safe)."""
    mask = mask.astype(jnp.float32)
    count = mask.sum()
    return -(logp * mask).sum() / jnp.maximum(count, 1.0), count
