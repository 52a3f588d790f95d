"""GFPO on the demo's synthetic task, after its SSFT run (`configs/demo.py`):

    python -m ssft_jax.train --config configs/demo.py --workdir /tmp/demo_ssft
    python -m ssft_jax.gfpo --config configs/gfpo_demo.py --init_from /tmp/demo_ssft --workdir /tmp/demo_gfpo

The model, tokenizer, tags and questions come from the SSFT run (gfpo.data='init'); this file sets the RL.
"""
from ssft_jax.config import base_config, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, variants=("tiny",))
    c = base_config()
    c.stage = "gfpo"
    c.tokenizer = "char"
    c.data.name = "synthetic"
    # 16 questions x 6 sampled tags = 96 rollouts per step: a GRPO group as large as the number of tags, so a
    # question whose tags differ in success gives a non-zero advantage most steps.
    c.gfpo.update(estimator="grpo", questions_per_step=16, group_size=6, num_steps=40, updates_per_batch=2,
                  clip_eps=0.2, kl_coef=0.01, temperature=0.7, top_p=1.0, valid_tags="used")
    # The loss reads only the tag position, but every weight it reaches also writes the traces, and Adam moves each
    # weight by about lr whatever the size of its gradient. Measured from the 900-step SSFT model: lr=3e-4 made the
    # policy deterministic in 4 steps, after which Adam's momentum kept moving the weights with no gradient left and
    # the rollouts' reward fell from 0.96 to 0.0 by step 19; lr=1e-5 sharpens the policy gradually (entropy 0.46 ->
    # 0.18 nats in 40 steps) and leaves the tag -> strategy map intact (README, GFPO).
    c.gfpo.optim.update(learning_rate=1e-5, warmup_frac=0.0, end_lr_frac=1.0, grad_clip=1.0)
    c.log_every = 1
    c.checkpoint.every_steps = 10
    if a["variant"] == "tiny":  # tests: a couple of steps
        c.gfpo.update(questions_per_step=4, group_size=3, num_steps=3, updates_per_batch=2)
        c.checkpoint.every_steps = 2
    return c
