"""Qwen2.5-7B-Instruct with the paper's SSFT recipe on a v5p-32 slice (16 chips, 95 GB HBM each).

Why this slice: fp32 master weights + Adam moments + gradients are ~16 bytes/param = ~122 GB, which FSDP over 16
chips spreads to ~7.6 GB per chip; a 32k-token row with full remat keeps activations to a few GB per chip, and the
global batch of 16 questions gives every chip one question per step (`python -m ssft_jax.plan_memory` prints the
breakdown).

    python -m ssft_jax.train --config configs/qwen2p5_7b.py:hf_dir=/ckpt/Qwen2.5-7B-Instruct,data=/data/s1k_multi.jsonl \
        --workdir gs://bucket/runs/q7
"""
from ssft_jax.config import base_config, paper_recipe, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, hf_dir="", data="")
    c = paper_recipe(base_config())
    c.model.hf_dir = a["hf_dir"]
    c.data.update(name="jsonl", path=a["data"])
    c.mesh.update(data=1, fsdp=16, tensor=1)
    c.micro_batches = 1
    return c
