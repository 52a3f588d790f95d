"""Tiny from-scratch run on the synthetic multi-strategy task: the CPU demo and the trainer's tests.

    python -m ssft_jax.train --config configs/demo.py --workdir /tmp/demo [--config.ssft.method=sft_mixed]
"""
from ssft_jax.config import base_config, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, variants=("tiny",))
    c = base_config()
    c.tokenizer = "char"
    c.model.hf_dir = ""
    c.model.init.update(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                        max_position_embeddings=1024)
    # L=12 characters already tell the strategies apart ("7+12=", "12+7=", "ones:", "7->10-3"); T=72 holds every
    # trace of the 'tiny' difficulty (two operands of 1-2 digits) with its end-of-turn token.
    c.ssft.update(num_tags=6, max_traces=4, cost_prefix_len=12, tag_mode="special")
    c.data.update(name="synthetic", max_prompt_len=40, max_trace_len=72)
    c.data.synthetic.update(num_questions=512, heldout=64, difficulty="tiny")
    c.batch_size = 16
    c.num_steps = 300
    c.model.remat = "full"  # on CPU, recomputing beats storing the attention residuals (measured in bench/)
    c.optim.update(learning_rate=5e-3, warmup_frac=0.05, weight_decay=1e-4, b2=0.98)
    c.log_every = 10
    c.checkpoint.every_steps = 100
    if a["variant"] == "tiny":  # what the tests run: a few steps of a 2-layer model
        c.model.init.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8)
        c.data.synthetic.update(num_questions=32, heldout=8, difficulty="tiny")
        c.ssft.cost_prefix_len = 16
        c.batch_size = 4
        c.num_steps = 6
        c.log_every = 1
        c.checkpoint.every_steps = 3
    return c
