"""A user-style strategy classifier for `python -m ssft_jax.demo --classifier demo_classifier:classify` (tests)."""
from ssft_jax.datasets import synthetic


def classify(record, text):
    return synthetic.classify_strategy(record, text)


classify.names = synthetic.STRATEGIES
