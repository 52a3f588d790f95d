"""Qwen2.5-32B-Instruct with the paper's SSFT recipe (the paper's model) on a v5p-64 slice (32 chips).

Why this slice: ~16 bytes/param of fp32 weights, Adam moments and gradients = ~525 GB; FSDP 16 x tensor 2 over 32
chips puts ~16 GB of state on each, and tensor parallelism halves the per-chip activations of the 32k-token rows
(64 heads / 8 KV heads split over 2). 16 questions per step = one per FSDP group.

    python -m ssft_jax.train --config configs/qwen2p5_32b.py:hf_dir=/ckpt/Qwen2.5-32B-Instruct,data=/data/s1k_multi.jsonl \
        --workdir gs://bucket/runs/q32
"""
from ssft_jax.config import base_config, paper_recipe, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, hf_dir="", data="")
    c = paper_recipe(base_config())
    c.model.hf_dir = a["hf_dir"]
    c.data.update(name="jsonl", path=a["data"])
    c.mesh.update(data=1, fsdp=16, tensor=2)
    c.micro_batches = 1
    return c
