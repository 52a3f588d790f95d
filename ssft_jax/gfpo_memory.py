"""Per-device memory plan of a GFPO stage (`stage="gfpo"` configs): `python -m ssft_jax.memory_plan --config C`.

GFPO alternates two phases that never overlap, on top of what stays resident (the model and its optimizer):

* rollouts (no gradient): `sampling._generate_core` per chunk of `gfpo.rollout_chunk`-like questions
  (`gfpo.rollout_chunk`: about 16, a multiple of the data-parallel size), G rows per question (grpo; enumerate: every
  valid tag x samples_per_tag). Its memory is the KV cache: the prompts' cache [layers, chunk, Lc, K, Dh] and its
  rows repeated to [layers, chunk * R, Lc, K, Dh], Lc = P + tag + max_new_tokens, in the compute dtype, rows split
  over the data axes and KV heads over `tensor` (as the inputs and the weights are); plus the prefill of one layer
  (chunk prompts of P tokens) and the sampler's [rows, V] fp32 logits (softmax, cumulative sum: 3 copies);
* the update: forward + backward over the step's questions' prompts (B / dp rows of W = P + tag-prefix tokens; only
  the tag position reaches the [D, V] head), one layer's backward live at a time under `model.remat`.

The resident part is the SSFT plan's (`memory_plan`): parameters (LoRA: the frozen base in `lora.base_dtype`, the
adapters in fp32), AdamW's two moments, the gradients and the update of what is trained, and the FSDP all-gathered
layers. The model is the config's own `model` / `lora` sections: a GFPO config that starts from a workdir gets them
from that run at start, so plan with the same sections written in (the configs here do).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ssft_jax import gfpo_estimators, lora as lora_lib, memory_plan as mp


def rollout_rows(g, num_valid_tags: int) -> int:
    """Rollouts per question (the estimator's rule)."""
    return gfpo_estimators.get(g.estimator).rollouts(int(g.group_size), num_valid_tags, int(g.samples_per_tag))


def rollout_chunk(batch: int, dp: int, target: int = 16) -> int:
    """Questions per sampler call (`gfpo.rollout_chunk`'s rule, repeated here without a mesh)."""
    return max(dp, min(batch, -(-target // dp) * dp))


def make_plan(config, *, num_devices: int | None = None, tag_len: int | None = None,
              config_name: str = "") -> mp.Plan:
    if config.get("stage", "ssft") != "gfpo":
        raise mp.PlanError("gfpo_memory.make_plan plans stage='gfpo' configs")
    facts = mp.resolve_model(config, tag_len)
    cfg = facts.cfg
    sizes, n_dev, why = mp.mesh_sizes(config, num_devices)
    g, d = config.gfpo, config.data
    N, Lt = config.ssft.num_tags, facts.tag_len
    P = d.max_prompt_len
    max_new = int(g.max_new_tokens or d.max_trace_len)
    valid = N if g.valid_tags in ("all", "used") else len(str(g.valid_tags).split(","))
    R = rollout_rows(g, valid)
    B = int(g.questions_per_step)
    dp, t = sizes["data"] * sizes["fsdp"], sizes["tensor"]
    chunk = rollout_chunk(B, dp)
    a = np.dtype(cfg.dtype).itemsize
    D, F, H, K, Dh, V, nl = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                             cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.num_hidden_layers)
    Ht, Kt, Ft, Vt = mp._split(H, t), mp._split(K, t), mp._split(F, t), mp._split(V, t)
    notes = list(facts.notes) + [
        "rollouts and the update alternate: the peak is the resident part plus the larger phase",
        "KV cache rows assumed split over the data axes and KV heads over tensor (as GSPMD places them from the "
        "inputs); the sampler keeps the whole vocabulary's logits per row"]

    lora_spec = lora_lib.spec_for_plan(config, cfg)
    if lora_spec is not None:
        cfg = cfg.replace(param_dtype=lora_spec.base_dtype)
    w = np.dtype(cfg.param_dtype).itemsize
    params = mp.parameter_bytes(cfg, sizes)
    pb = params["local_bytes"]
    layer = params["layer_elems_gathered"]
    gathered = (2 * layer * a + Vt * D * a) if (sizes["fsdp"] > 1 or cfg.param_dtype != cfg.dtype) else 0
    if lora_spec is None:
        trained, what = pb, f"{mp._count(params['count'])} params x {w} B"
        rows = [("parameters", pb, f"exact per-device shards of {what}")]
    else:
        ad = mp.lora_bytes(cfg, lora_spec, sizes)
        params["lora_count"] = ad["count"]
        trained = ad["local_bytes"]
        rows = [("parameters", pb, f"frozen base: {mp._count(params['count'])} params x {w} B ({cfg.param_dtype})"),
                ("adapters (trainable)", trained, f"LoRA r={lora_spec.rank}: {mp._count(ad['count'])} params x 4 B")]
    rows += [
        ("optimizer state", 2 * trained, "AdamW mu + nu of what GFPO trains"),
        ("gradients", trained, "one update's gradients (updates_per_batch epochs run one after another)"),
        ("optimizer update", trained, "the `updates` tree"),
        ("gathered weights", gathered, "FSDP all-gather / cast: 2 layers (compute dtype) + output head"),
    ]

    # (a) rollouts, one sampler call
    Lc = P + Lt + max_new
    prompts_dev = math.ceil(chunk / dp)
    rows_dev = math.ceil(chunk * R / dp)
    kv_row = nl * 2 * Lc * Kt * Dh * a + Lc * 4  # keys + values, every layer; segment ids
    attn_tok = (Ht + 2 * Kt) * Dh * a + (Ht + Kt) * Dh * 4 + Ht * Dh * a
    prefill = prompts_dev * P * (attn_tok + 3 * Ft * a + D * (a + 4)) + prompts_dev * Ht * P * P * (4 + a)
    rollout = {
        "KV cache of the rows": rows_dev * kv_row,
        "KV cache of the prompts (before repeat)": prompts_dev * kv_row,
        "prefill of one layer": prefill,
        "logits + sampling (fp32, 3 copies)": rows_dev * V * 4 * 3,
        "generated tokens": rows_dev * max_new * 4 * 2,
    }
    rollout["total"] = sum(rollout.values())

    # (b) the update: prompt-only rows with grad
    W = P + Lt
    r = math.ceil(B / dp)
    stored_tok = (3 * D + (Ht + 2 * Kt) * Dh + Ht * Dh + 2 * Ft) * a
    carry = nl * r * W * D * a + r * W * D * a
    saved = carry if cfg.remat == "full" else carry + nl * r * W * stored_tok
    bwd = max(r * W * (Ht + 2 * Kt) * Dh * a + r * Ht * W * W * (3 * 4 + a), r * W * (3 * Ft * a + D * (a + 4)))
    update = {"saved for backward": saved, "one layer recomputed": r * W * stored_tok,
              "layer backward peak": bwd, "residual cotangent": r * W * D * (a + 4),
              "tag-position head (fp32, 3 copies)": r * Vt * 4 * 3}
    update["total"] = sum(update.values())

    batch_in = B * (W + 2 + 4 * N + 2 * R) * 4
    rows.append(("batch (inputs)", batch_in, f"{B} questions: policy rows, logp_old/ref, tags, rewards"))
    dims = dict(N=N, M=config.ssft.max_traces, L=config.ssft.cost_prefix_len, Le=0, P=P, T=max_new, Lt=Lt,
                R=Lc, S=W, b=r, micro_batches=1, dp=dp, cost_layout="-", packed=False, train_rows=r,
                batch_size=B, remat=cfg.remat, attention_chunk=cfg.attention_chunk,
                logprob_chunk=config.model.logprob_chunk,
                lora=(f"r={lora_spec.rank} alpha={lora_spec.alpha:g} base {lora_spec.base_dtype}"
                      if lora_spec is not None else ""),
                cost_attention="dense", train_attention="dense", dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                stage="gfpo", estimator=g.estimator, rollouts_per_question=R, rollout_chunk=chunk,
                max_new_tokens=max_new, cache_len=Lc)
    return mp.Plan(config_name, facts.source, cfg, sizes, n_dev, why, dims, params, rows, rollout, update, notes,
                   accelerator=config.accelerator)


def describe_dims(d: dict[str, Any]) -> list[str]:
    """The GFPO plan's header lines (in place of the SSFT plan's rows line)."""
    return [f"GFPO: {d['batch_size']} questions per step / dp {d['dp']}; {d['estimator']}: "
            f"{d['rollouts_per_question']} rollouts per question, {d['rollout_chunk']} questions per sampler call; "
            f"KV cache of P + Lt + max_new_tokens = {d['P']} + {d['Lt']} + {d['max_new_tokens']} = {d['cache_len']} "
            f"tokens per row; update rows of W = P + Lt = {d['S']} tokens; remat={d['remat']}, compute {d['dtype']}, "
            f"params {d['param_dtype']}"]
