"""Qwen2.5-0.5B-Instruct with the paper's SSFT recipe on a small TPU slice (v5p-8 / v4-8: 4 chips).

`python -m ssft_jax.memory_plan --config configs/qwen2p5_0p5b.py` (per chip, estimate): 3.1 GiB of weight state
and 25.9 GiB of activations for one question's 4 rows of 32742 tokens = 29.1 GiB: v5p-8 with 65.9 GiB headroom;
v4-8 / v6e fit with only 2.9 GiB (tight); v5e (16 GiB) does not.

    python -m ssft_jax.train --config configs/qwen2p5_0p5b.py:hf_dir=/ckpt/Qwen2.5-0.5B-Instruct,data=/data/s1k_multi.jsonl \
        --workdir gs://bucket/runs/q05
"""
from ssft_jax.config import base_config, paper_recipe, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, hf_dir="", data="")
    c = paper_recipe(base_config())
    c.model.hf_dir = a["hf_dir"]
    c.model.preset = "qwen2.5-0.5b"  # architecture for ssft_jax.memory_plan when hf_dir is not staged here
    c.accelerator = "v5p-8"  # the slice this config is sized for (memory_plan's default device count)
    c.data.update(name="jsonl", path=a["data"])
    # FSDP over the 4 chips: 16 questions / 4 micro-batches = 4 per forward, one per chip.
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.micro_batches = 4
    return c
