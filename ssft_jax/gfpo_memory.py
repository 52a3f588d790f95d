"""The GFPO stage's memory arithmetic, read by `memory_plan` (`python -m ssft_jax.memory_plan --config C` plans a
stage="gfpo" config with it; the resident part, the verdicts and the table are the SSFT plan's).

GFPO alternates two phases that never overlap, on top of what stays resident (the model and its optimizer):

* rollouts (no gradient): `sampling._generate_core` per chunk of questions (`gfpo.rollout_chunk`: about 16, a
  multiple of the data-parallel size), R rows per question (grpo: G; enumerate: every valid tag x samples_per_tag).
  Its memory is the KV cache: the prompts' cache [layers, chunk, Lc, K, Dh] and its rows repeated to
  [layers, chunk * R, Lc, K, Dh], Lc = P + tag + max_new_tokens, in the compute dtype, rows split over the data axes
  and KV heads over `tensor` (as the inputs and the weights are); plus the prefill of one layer (chunk prompts of P
  tokens) and the sampler's [rows, V] fp32 logits (softmax, cumulative sum: 3 copies);
* the update: forward + backward over the step's questions' prompts (B / dp rows of W = P + tag-prefix tokens; only
  the tag position reaches the [D, V] head), one layer's backward live at a time under `model.remat`.

The model is the config's own `model` / `lora` sections: a GFPO config that starts from a workdir gets them from
that run at start, so plan with the same sections written in (the configs here do).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from ssft_jax import config as config_lib, gfpo_estimators


def _split(n: int, parts: int) -> float:
    return n / parts if parts > 1 and n % parts == 0 else n


def rollout_rows(g, num_valid_tags: int) -> int:
    """Rollouts per question (the estimator's rule)."""
    return gfpo_estimators.get(g.estimator).rollouts(int(g.group_size), num_valid_tags, int(g.samples_per_tag))


def rollout_chunk(batch: int, dp: int, target: int = 16) -> int:
    """Questions per sampler call, for the run (`gfpo.roll_out`) and the plan: about `target`, a multiple of the
    data-parallel size `dp` (the rows split evenly over the devices), at most the step's batch."""
    return max(dp, min(batch, -(-target // dp) * dp))


@dataclasses.dataclass(frozen=True)
class GfpoShape:
    questions: int  # B, per step (global)
    rollouts: int  # R, per question
    chunk: int  # questions per sampler call
    cache_len: int  # Lc = P + Lt + max_new_tokens
    max_new: int
    update_width: int  # W = P + Lt
    dp: int

    def dims(self, estimator: str) -> dict[str, Any]:
        return dict(stage="gfpo", estimator=estimator, rollouts_per_question=self.rollouts, rollout_chunk=self.chunk,
                    max_new_tokens=self.max_new, cache_len=self.cache_len)


def shape(config, sizes: Mapping[str, int], tag_len: int) -> GfpoShape:
    g, d = config.gfpo, config.data
    N = config.ssft.num_tags
    explicit = config_lib.parse_valid_tags(g.valid_tags, N)  # all / used: every tag, as far as a plan can know
    valid = N if explicit is None else len(explicit)
    dp = sizes["data"] * sizes["fsdp"]
    max_new = int(g.max_new_tokens or d.max_trace_len)
    B = int(g.questions_per_step)
    return GfpoShape(B, rollout_rows(g, valid), rollout_chunk(B, dp), d.max_prompt_len + tag_len + max_new, max_new,
                     d.max_prompt_len + tag_len, dp)


def _heads(cfg, sizes):
    t = sizes["tensor"]
    return (_split(cfg.num_attention_heads, t), _split(cfg.num_key_value_heads, t),
            _split(cfg.intermediate_size, t), _split(cfg.vocab_size, t))


def rollout_bytes(cfg, s: GfpoShape, sizes: Mapping[str, int]) -> dict[str, float]:
    """Per device, one sampler call (the phase's peak)."""
    a = np.dtype(cfg.dtype).itemsize
    D, Dh, V, nl = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.num_hidden_layers
    Ht, Kt, Ft, _ = _heads(cfg, sizes)
    P = s.update_width
    prompts, rows = math.ceil(s.chunk / s.dp), math.ceil(s.chunk * s.rollouts / s.dp)
    kv_row = nl * 2 * s.cache_len * Kt * Dh * a + s.cache_len * 4  # keys + values of every layer; segment ids
    attn_tok = (Ht + 2 * Kt) * Dh * a + (Ht + Kt) * Dh * 4 + Ht * Dh * a
    out = {
        "KV cache of the rows": rows * kv_row,
        "KV cache of the prompts (before repeat)": prompts * kv_row,
        "prefill of one layer": prompts * P * (attn_tok + 3 * Ft * a + D * (a + 4)) + prompts * Ht * P * P * (4 + a),
        "logits + sampling (fp32, 3 copies)": rows * V * 4 * 3,
        "generated tokens": rows * s.max_new * 4 * 2,
    }
    out["total"] = sum(out.values())
    return out


def update_bytes(cfg, s: GfpoShape, sizes: Mapping[str, int]) -> dict[str, float]:
    """Per device, the update's forward + backward over the prompt rows."""
    a = np.dtype(cfg.dtype).itemsize
    D, Dh, nl = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    Ht, Kt, Ft, Vt = _heads(cfg, sizes)
    W, r = s.update_width, math.ceil(s.questions / s.dp)
    stored_tok = (3 * D + (Ht + 2 * Kt) * Dh + Ht * Dh + 2 * Ft) * a
    carry = nl * r * W * D * a + r * W * D * a
    out = {"saved for backward": carry if cfg.remat == "full" else carry + nl * r * W * stored_tok,
           "one layer recomputed": r * W * stored_tok,
           "layer backward peak": max(r * W * (Ht + 2 * Kt) * Dh * a + r * Ht * W * W * (3 * 4 + a),
                                      r * W * (3 * Ft * a + D * (a + 4))),
           "residual cotangent": r * W * D * (a + 4),
           "tag-position head (fp32, 3 copies)": r * Vt * 4 * 3}
    out["total"] = sum(out.values())
    return out


def batch_bytes(s: GfpoShape, num_tags: int) -> int:
    return s.questions * (s.update_width + 2 + 4 * num_tags + 2 * s.rollouts) * 4


def describe_dims(d: Mapping[str, Any]) -> list[str]:
    """The GFPO plan's header lines (in place of the SSFT plan's rows line)."""
    return [f"GFPO: {d['batch_size']} questions per step / dp {d['dp']}; {d['estimator']}: "
            f"{d['rollouts_per_question']} rollouts per question, {d['rollout_chunk']} questions per sampler call; "
            f"KV cache of P + Lt + max_new_tokens = {d['P']} + {d['Lt']} + {d['max_new_tokens']} = {d['cache_len']} "
            f"tokens per row; update rows of W = P + Lt = {d['S']} tokens; remat={d['remat']}, compute {d['dtype']}, "
            f"params {d['param_dtype']}"]
