"""FLOPs of one SSFT train step, from the shapes alone, and the peak FLOP/s of common accelerators (for MFU).

Counted as in the MFU literature (PaLM appendix B, MaxText): 2 FLOPs per multiply-add of every matmul, the
attention score and value products over the full (padded) rows the step computes, backward = 2x forward. Two
figures:
  model     what the method needs: cost pass forward (no gradient) + train pass forward and backward. MFU uses it.
  executed  also the recomputation the step actually does: the output head's chunks (always rematerialised) and,
            under `model.remat != "none"`, the decoder layers' forward again in the backward pass. This is what XLA's
            `cost_analysis()` sees (tests compare the two).
Elementwise work (norms, RoPE, softmax, SiLU) is left out: it is a few percent at real widths.
"""
from __future__ import annotations

import dataclasses

from ssft_jax import cost_layouts
from ssft_jax.model import ModelConfig

# Dense bf16 peak per chip / device (FLOP/s), from the vendors' spec sheets. JAX sees one device per chip on TPU
# v4/v5p (megacore) and per GPU. Extend with `logging.peak_flops` in the config for anything else.
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e (device_kind "TPU v5 lite")
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e Trillium
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM, dense bf16
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of one device of this kind (`jax.devices()[0].device_kind`), or None when unknown (CPU)."""
    if override:
        return float(override)
    for kind in sorted(PEAK_FLOPS, key=len, reverse=True):  # the most specific name first
        if device_kind.startswith(kind) or kind in device_kind:
            return PEAK_FLOPS[kind]
    return None


def _linear_params_per_layer(cfg: ModelConfig) -> int:
    D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    F = cfg.intermediate_size
    return D * (H + 2 * K) * hd + H * hd * D + 3 * D * F


def forward_flops(cfg: ModelConfig, rows: int, q_len: int, kv_len: int | None = None) -> dict[str, float]:
    """One forward over `rows` rows of `q_len` queries attending to `kv_len` keys (default q_len), split into the
    decoder layers and the output head (which runs on every position: the chunked log-softmax)."""
    kv_len = q_len if kv_len is None else kv_len
    n = rows * q_len
    layer = 2 * n * _linear_params_per_layer(cfg) + 4 * rows * cfg.num_attention_heads * q_len * kv_len * cfg.head_dim
    return {"layers": float(cfg.num_hidden_layers * layer), "head": float(2 * n * cfg.hidden_size * cfg.vocab_size)}


@dataclasses.dataclass(frozen=True)
class StepFlops:
    cost_pass: float  # forward only
    train_pass: float  # forward + backward
    recompute: float  # rematerialised forward work

    @property
    def model(self) -> float:
        return self.cost_pass + self.train_pass

    @property
    def executed(self) -> float:
        return self.model + self.recompute


def step_flops(cfg: ModelConfig, layout, batch_size: int, *, needs_costs: bool, cost_layout: str = "packed",
               remat: str | None = None) -> StepFlops:
    """FLOPs of one step over `batch_size` questions (global) in `layout` (a data.LayoutConfig)."""
    remat = cfg.remat if remat is None else remat
    cost = 0.0
    if needs_costs:  # the layout's own rule (cost_layouts: the registry losses.cost_matrix runs)
        cost = cost_layouts.get(cost_layout).flops(cfg, layout, batch_size, forward_flops)
    if layout.packed:  # pack_rows rows of pack_len per process batch, scaled to the global batch
        t = forward_flops(cfg, layout.pack_rows * batch_size // layout.batch_size, layout.pack_row_len)
    else:
        t = forward_flops(cfg, batch_size * layout.num_traces, layout.train_row_len)
    train = 3 * (t["layers"] + t["head"])
    recompute = t["head"] + (t["layers"] if remat != "none" else 0.0)
    return StepFlops(cost, train, recompute)
