"""Qwen2.5-7B-Instruct with the paper's SSFT recipe on a v5p-32 slice (16 chips, 95 GiB HBM each).

Why this slice (`python -m ssft_jax.memory_plan --config configs/qwen2p5_7b.py`, per chip, estimate): the weight
state is small once sharded -- fp32 parameters 1.77 GiB, AdamW moments 3.55, gradients (accumulated + current)
3.55, the update 1.77, FSDP-gathered layers 2.75 = 13.4 GiB over FSDP 16 -- but the activations of one question's
M=4 training rows of S = 32742 tokens are not: the layer scan keeps every layer's input (28 x 4 x 32742 x 3584 bf16 =
25.4 GiB), one layer is recomputed for its backward (13.9 GiB) and one 512-query attention block's scores
[4, 28, 512, 32742] with their gradient peak at 25.7 GiB; with the head's log-softmax chunk that is 71.9 GiB, 85.3
GiB in all: it fits on v5p with 9.7 GiB headroom (attention_chunk=128 lowers it to 76.1 GiB, 18.9 headroom). Those
activations do not shrink with more chips (one question per chip is the floor: batch 16 over FSDP 16), so no
32 GiB chip (v4, v6e) can take the 32k-token rows; fewer v5p chips put 2 questions on each (v5p-16: 164 GiB, or
95.9 with micro_batches=2: just over). The estimate assumes the Adam moments and the activations are sharded as
intended; `--compile` checks the real step (see the planner's notes).

    python -m ssft_jax.train \
        --config configs/qwen2p5_7b.py:hf_dir=/ckpt/Qwen2.5-7B-Instruct,data=/data/s1k_multi.jsonl \
        --workdir gs://bucket/runs/q7
"""
from ssft_jax.config import base_config, paper_recipe, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, hf_dir="", data="")
    c = paper_recipe(base_config())
    c.model.hf_dir = a["hf_dir"]
    c.model.preset = "qwen2.5-7b"  # architecture for ssft_jax.memory_plan when hf_dir is not staged here
    c.accelerator = "v5p-32"  # the slice this config is sized for (memory_plan's default device count)
    c.data.update(name="jsonl", path=a["data"])
    c.mesh.update(data=1, fsdp=16, tensor=1)
    c.micro_batches = 1
    return c
