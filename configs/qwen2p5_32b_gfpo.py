"""GFPO (the paper's second stage) on Qwen2.5-32B after SSFT (`configs/qwen2p5_32b.py`), on the same v5p-64 slice.

What the paper says of its GFPO run (arXiv 2510.05132 v2, and its released RL checkpoint's card): RL on the global
forking tokens only, after SSFT-32B; "only 10 RL steps" over ~1k math prompts with verifiable answers; GRPO-style
groups of tags drawn from the model's own tag policy; AIME25 Cons@6 73.94 -> 78.48, LiveCodeBench 38.92 -> 42.10.
Known and set here: N=6 forking tags (`paper_recipe`), num_steps=10, prompt-only math data, the grpo estimator.
Inferred (the paper does not give them; change freely): questions_per_step=96 (1k prompts over 10 steps, rounded to
a multiple of the 16-way data parallelism), group_size=6 (G = N, so every tag can be drawn once per question),
lr 1e-6 constant (a usual GRPO rate at 32B; GFPO moves every weight the tag position reaches), kl_coef=0, one PPO
epoch per batch, clip 0.2, rollouts at temperature 0.6 / top_p 0.95 (Qwen's reasoning sampling settings) up to
15712 new tokens (the SSFT config's trace budget), the math checker.

Memory (`python -m ssft_jax.memory_plan --config configs/qwen2p5_32b_gfpo.py`, per chip, estimate): 65.8 GiB, fits
v5p's 95 with 29.2 GiB headroom: the resident weight state 20.7 (FSDP 16 x tensor 2: fp32 weights, Adam, gradients,
the update, gathered layers), then the rollouts 45.1 (the bf16 decoding copy 30.5, the KV cache of 16 questions x 6
rows of up to 16742 tokens 14.3) or the update 6.3.

Start from the SSFT run's HF export staged on every worker (a gs:// workdir is not read by `--init_from`):

    python -m launch.tpu all --name q32-gfpo --zone us-east5-a --accelerator_type v5p-64 \
        --config 'configs/qwen2p5_32b_gfpo.py:init_from=/ckpt/ssft32b,data=/data/math_prompts.jsonl' \
        --stage gs://bucket/runs/q32/hf_export=/ckpt/ssft32b --workdir gs://bucket/runs/q32_gfpo --dry_run
"""
from ssft_jax.config import base_config, paper_recipe, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, init_from="", data="")
    c = paper_recipe(base_config())
    c.stage = "gfpo"
    c.model.preset = "qwen2.5-32b"  # the plan's architecture; the weights come from gfpo.init_from
    c.accelerator = "v5p-64"
    c.mesh.update(data=1, fsdp=16, tensor=2)
    c.data.update(max_prompt_len=1024, max_trace_len=15712)
    c.gfpo.update(init_from=a["init_from"], data=a["data"] or "config", checker="math", estimator="grpo",
                  questions_per_step=96, group_size=6, num_steps=10, updates_per_batch=1, clip_eps=0.2, kl_coef=0.0,
                  temperature=0.6, top_p=0.95, max_new_tokens=15712, valid_tags="used",
                  # decode from a bf16 copy split over tensor only: under FSDP 16 the training layout would
                  # all-gather every layer for every decoded token (~29 GiB per chip per token)
                  rollout_weights="replicated")
    c.gfpo.optim.update(learning_rate=1e-6, warmup_frac=0.0, end_lr_frac=1.0, grad_clip=1.0)
    c.checkpoint.every_steps = 2
    return c
