"""Tiny from-scratch run on the synthetic multi-strategy task: the CPU demo and the trainer's tests.

    python -m ssft_jax.train --config configs/demo.py --workdir /tmp/demo [--config.ssft.method=sft_mixed]
"""
from ssft_jax.config import base_config, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, variants=("tiny",))
    c = base_config()
    c.tokenizer = "char"
    c.model.hf_dir = ""
    # What the budget buys. `make demo` trains 3 seeds x (sft_mixed, random, ssft) + GFPO in ~15 minutes on 2 CPU
    # cores: ~2 core-minutes per training run. A from-scratch model spends most of its steps on arithmetic (on the
    # 'tiny' task, 1-2 digit operands, Pass@1 was ~0 at 300 steps and ~0.9 only at 900), so the task is 'digits':
    # 2-4 one-digit operands, whose running sums are a table small enough to memorise, while the strategies still
    # differ in how hard a question is for them: place_value adds all operands in one step (hard with four),
    # round_tens trades that for rounding and corrections, the running sums go through different partial sums.
    # Their success depends on the question, so voting across tags (Cons@N), Pass@N and choosing a tag can pay.
    # The strategies are the 'styles' set (dataset synthetic_styles): running sum, bracketed pairs, place value,
    # rounding to tens, four different structures. The 'order' set's left-to-right and right-to-left sums differ
    # only in the order the operands are taken; at this budget the model does not yet copy operands in order, so
    # neither is recognisable in its output and the two shared four tags (MI/log M 0.77, 2.6 of 4 strategies over 3
    # seeds, measured); a tag steers a structure from the first step, which is what the demo has to show.
    # The model is as large as ~200 steps of 8 questions at one core per seed allow (d=96: measured, d=64 copied
    # operands wrongly at this budget, d=128 costs ~1.6x per step).
    c.model.init.update(model_type="qwen2", hidden_size=96, intermediate_size=288, num_hidden_layers=4,
                        num_attention_heads=3, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                        max_position_embeddings=1024)
    # L=12 characters already tell the strategies apart ("3+4=", "(3+4)", "ones:", "3->0+3"; the L advisor finds
    # every trace pair apart by token 2); `demo.fit_budgets` sets P and T to what the data needs.
    # prefix_cache: the 24 cost rows of a question share one prompt forward, so the cost pass is a few percent of
    # the step at this L and SSFT costs about what SFT-mixed does.
    c.ssft.update(num_tags=6, max_traces=4, cost_prefix_len=12, tag_mode="special", cost_layout="prefix_cache")
    c.data.update(name="synthetic_styles", max_prompt_len=40, max_trace_len=96)
    # 1024 questions: the 182 training multisets of one-digit operands, in their orders (held-out multisets never
    # occur in training in any order).
    c.data.synthetic.update(num_questions=1024, heldout=64, difficulty="digits")
    c.batch_size = 8
    c.num_steps = 200
    c.model.remat = "full"  # on CPU, recomputing beats storing the attention residuals (measured in bench/)
    c.optim.update(learning_rate=5e-3, warmup_frac=0.05, weight_decay=1e-4, b2=0.98)
    c.log_every = 10
    c.checkpoint.every_steps = 100
    if a["variant"] == "tiny":  # what the tests run: a few steps of a 2-layer model
        c.model.init.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8)
        # The tests' task and cost layout are the reference ones (the 'tiny' task, the packed cost pass).
        c.data.name = "synthetic"
        c.data.synthetic.update(num_questions=32, heldout=8, difficulty="tiny")
        c.data.max_trace_len = 72
        c.ssft.cost_layout = "packed"
        c.ssft.cost_prefix_len = 16
        c.batch_size = 4
        c.num_steps = 6
        c.log_every = 1
        c.checkpoint.every_steps = 3
    return c
