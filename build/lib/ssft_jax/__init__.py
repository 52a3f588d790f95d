"""ssft-jax: Set Supervised Fine-Tuning with global forking tokens, in JAX."""

__version__ = "0.1.0"
