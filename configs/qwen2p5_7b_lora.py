"""Qwen2.5-7B-Instruct, SSFT with LoRA (ssft_jax/lora.py): the base frozen in bf16, rank-16 adapters on every
projection, sized for Colab / small TPU slices (issue 21). `python -m ssft_jax.memory_plan --config
configs/qwen2p5_7b_lora.py[:chips=4]`.

What the plan says (per chip, estimate; text-mode tags, so no tag rows and no embedding copies):
- chips=1 (v5e-1, 16 GiB): does NOT fit: 22.2 GiB. The frozen bf16 base alone is 7.616B x 2 B = 14.19 GiB; the
  adapters' state (40.4M params: fp32 weights, Adam mu + nu, 2 gradient sets, the update) is 0.90 GiB, which
  leaves 0.9 GiB for SSFT's activations, and one question's 4 training rows of 2566 tokens need 7.1 (the layer
  scan's carry 2.0, one layer's backward 2.0, the output head's log-softmax chunk over 152k words 1.8). No rank or
  row length makes a bf16 7B base plus SSFT rows fit 16 GiB; a quantized base does (quant=nf4, below).
- chips=4 (v5litepod-4, 4 x 16 GiB): fits, 13.2 GiB per chip (2.8 headroom): FSDP over 4 shards the base to 3.55
  GiB per chip; gathered layers + head 1.9; the same rows.
- chips=1,quant=nf4 (QLoRA, `lora.base_quant`, ssft_jax/quant.py): fits v5e-1 by the plan: 14.3 GiB per chip,
  1.7 GiB headroom (base 5.45 GiB instead of 14.19, one dequantized layer pair 0.87, adapters 0.90, the same rows
  7.10). The seven projections (93% of the parameters) as nf4 + fp32 block scales; embedding and head stay bf16.
  quant=int8 plans 17.0 GiB (base 8.11): 1.0 GiB over one v5e chip; it fits two.
Full fine-tuning of the same model and rows (fp32 weights, Adam moments, gradients) plans 180.1 GiB per chip on one
chip and 52.4 GiB per chip on v5litepod-4 (`--config.lora.enabled=False --config.model.param_dtype=float32`).

The rows are shorter than the paper's 32k (P=512, T=2048: GSM8K-length traces); tag_mode is the paper's text tags
(their tokens are ordinary vocabulary rows, frozen; `tag_mode=special` adds tag rows and, untied, two [V, D] table
copies, +4.1 GiB per chip at fsdp=1). LoRA wants a larger learning rate than full fine-tuning (1e-4 here).

    python -m ssft_jax.train --config configs/qwen2p5_7b_lora.py:hf_dir=/ckpt/Qwen2.5-7B-Instruct,data=d.jsonl,chips=4 \
        --workdir runs/q7_lora
    python -m ssft_jax.train --config configs/qwen2p5_7b_lora.py:hf_dir=...,data=d.jsonl,chips=1,quant=nf4 \
        --workdir runs/q7_qlora        # one v5e chip (Colab)
"""
from ssft_jax.config import base_config, paper_recipe, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, hf_dir="", data="", chips="1", quant="")
    chips = int(a["chips"])
    c = paper_recipe(base_config())
    c.model.hf_dir = a["hf_dir"]
    c.model.preset = "qwen2.5-7b"
    # Loaded straight in bf16: an fp32 copy of the base would not fit one chip even for a moment.
    c.model.update(param_dtype="bfloat16", dtype="bfloat16", remat="full", attention_chunk=512, logprob_chunk=1024)
    c.lora.update(enabled=True, rank=16, alpha=32.0, dropout=0.05, base_dtype="bfloat16", base_quant=a["quant"])
    c.accelerator = f"v5litepod-{chips}"
    c.data.update(name="jsonl", path=a["data"], max_prompt_len=512, max_trace_len=2048)
    c.ssft.cost_prefix_len = 256
    c.optim.learning_rate = 1e-4
    c.batch_size = 4 * chips  # 4 micro-batches of one question per chip
    c.micro_batches = 4
    c.mesh.update(data=1, fsdp=chips, tensor=1)
    return c
