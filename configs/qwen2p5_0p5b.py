"""Qwen2.5-0.5B-Instruct with the paper's SSFT recipe on a small TPU slice (v5p-8 / v4-8: 4 chips).

`python -m ssft_jax.memory_plan --config configs/qwen2p5_0p5b.py` (per chip, estimate): 3.1 GiB of weight state
and 25.9 GiB of activations for one question's 4 rows of 32742 tokens = 29.1 GiB: v5p-8 with 65.9 GiB headroom;
v4-8 / v6e fit with only 2.9 GiB (tight); v5e (16 GiB) does not.

    python -m ssft_jax.train \
        --config configs/qwen2p5_0p5b.py:hf_dir=/ckpt/Qwen2.5-0.5B-Instruct,data=/data/s1k_multi.jsonl \
        --workdir gs://bucket/runs/q05
"""
from ssft_jax.config import base_config, paper_recipe, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, variants=("colab",), hf_dir="", data="", chips="4")
    c = paper_recipe(base_config())
    c.model.hf_dir = a["hf_dir"]
    c.model.preset = "qwen2.5-0.5b"  # architecture for ssft_jax.memory_plan when hf_dir is not staged here
    c.accelerator = "v5p-8"  # the slice this config is sized for (memory_plan's default device count)
    c.data.update(name="jsonl", path=a["data"])
    # FSDP over the 4 chips: 16 questions / 4 micro-batches = 4 per forward, one per chip.
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.micro_batches = 4
    if a["variant"] == "colab":  # launch/colab_quickstart.ipynb on a Colab TPU runtime (v5e-1, or a v5e/v4 slice)
        # The synthetic multi-trace task with budgets shrunk to it (P=128, T=160, L=24 instead of 32k-token rows).
        c.data.update(name="synthetic", path="", max_prompt_len=128, max_trace_len=160, overlong="truncate",
                      on_bad_record="skip")
        c.data.synthetic.update(num_questions=512, heldout=32, difficulty="easy")
        c.ssft.cost_prefix_len = 24
        c.batch_size, c.num_steps = 16, 120
        c.optim.update(learning_rate=2e-5, warmup_frac=0.05)
        c.mesh.update(data=1, fsdp=-1, tensor=1, num_devices=0)  # FSDP over every chip of the runtime
        c.checkpoint.update(every_steps=60, max_to_keep=1)
        c.log_every = 10
        chips = int(a["chips"])
        c.accelerator = f"v5litepod-{chips}"
        if chips == 1:
            # One v5e chip (16 GiB): full fine-tuning needs 17.4 GiB by the planner (11 GiB of fp32 weights, Adam
            # moments and gradients alone), so the one-chip run trains LoRA adapters over a frozen bf16 base:
            # 5.8 GiB with 2 micro-batches, 10.2 GiB headroom (tests/test_colab_notebook.py checks the verdict).
            c.lora.update(enabled=True, rank=16, alpha=32.0)
            c.optim.learning_rate = 1e-4
            c.micro_batches = 2
        else:
            c.micro_batches = 1  # full fine-tuning, FSDP: 7.2 GiB per chip on 4 v5e chips
    return c
