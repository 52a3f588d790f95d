"""Qwen2.5-32B-Instruct with the paper's SSFT recipe (the paper's model) on a v5p-64 slice (32 chips).

Slice (`python -m ssft_jax.memory_plan --config configs/qwen2p5_32b.py`, per chip, estimate): FSDP 16 x tensor 2
(40 heads / 8 KV heads / 27648 MLP split over 2) brings the weight state to 25.4 GiB (fp32 parameters 3.82, AdamW
moments 7.64, gradients 7.64, the update 3.82, gathered layers 2.54), but at the paper's 32k-token rows this config
does NOT fit v5p's 95 GiB: 143.8 GiB per chip, because the layer scan keeps every layer's input for one question's 4
training rows (64 x 4 x 32742 x 5120 bf16 = 81.2 GiB) on top of one recomputed layer (12.0) and an attention
block's backward (18.4). That residual term is per question and batch 16 allows at most 16-way data parallelism,
so more chips do not remove it (v5p-128 with tensor 4: 116.9 GiB; v5p-256 with tensor 8: 105.1 GiB). What fits:
rows of ~16k tokens (`--config.data.max_trace_len=15712`: 86.8 GiB, 8.2 GiB headroom, tight) on this v5p-64, or
sharding the saved residuals over the tensor axis (sequence parallelism; not implemented). The estimate assumes the
Adam moments and the activations are sharded as intended; `--compile` checks the real step.

So this config defaults to the rows that fit its slice: traces up to 15712 tokens (P + Lt + T = 16742-token rows;
longer traces are truncated and counted, see data.overlong). `:max_trace_len=31712` gives the paper's 32k rows, for
a slice with more HBM per chip or once saved residuals are sequence-sharded.

    python -m ssft_jax.train \
        --config configs/qwen2p5_32b.py:hf_dir=/ckpt/Qwen2.5-32B-Instruct,data=/data/s1k_multi.jsonl \
        --workdir gs://bucket/runs/q32
"""
from ssft_jax.config import base_config, paper_recipe, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, hf_dir="", data="", max_trace_len="15712")
    c = paper_recipe(base_config())
    c.data.max_trace_len = int(a["max_trace_len"])  # see the docstring: 32k rows do not fit a v5p-64
    c.model.hf_dir = a["hf_dir"]
    c.model.preset = "qwen2.5-32b"  # architecture for ssft_jax.memory_plan when hf_dir is not staged here
    c.accelerator = "v5p-64"  # the slice this config is sized for (memory_plan's default device count)
    c.data.update(name="jsonl", path=a["data"])
    c.mesh.update(data=1, fsdp=16, tensor=2)
    c.micro_batches = 1
    return c
