"""What a training run reports beside its losses: learning rate, step time, token throughput (real tokens and the
slots computed for them, so the padding share is visible), MFU, and the held-out evaluation run every `eval_every`
steps. Host-side only: nothing here is traced into the step, so none of it can change the training trajectory."""
from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np

from ssft_jax import flops as flops_lib


class Throughput:
    """Per-step token counts (from the host batch, before it goes to the devices) and wall time per step.

    Step k's time runs from when the loop took its batch to when it took step k+1's (or, for the newest step, to
    the moment it is reported). That is the step's time whether the backend runs a step asynchronously (the loop
    waits on step k while step k+1 is queued) or inline in the dispatching call (CPU): time measured from one
    report to the next would give a step reported right after its predecessor (log_every=1 before a checkpoint,
    the last step) ~0 s and the other its time twice. Time spent in in-training evaluation is taken out
    (`exclude`); the run's first step holds compilation (the trainer logs it on its own line)."""

    def __init__(self, model_flops_per_step: float, num_devices: int, peak_per_device: float | None):
        self.model_flops = model_flops_per_step
        self.peak = peak_per_device * num_devices if peak_per_device else None
        self._counts: dict[int, tuple[int, int]] = {}  # step -> (real tokens, computed slots)
        self._started: dict[int, float] = {}  # step -> when the loop took its batch
        self._excluded = 0.0
        self._last_step = None

    def add_batch(self, step: int, batch: dict, *, with_cost_pass: bool) -> None:
        """Count step `step`'s tokens: each process sees its own rows, so its counts scale by the process count."""
        views = ("train", "cost") if with_cost_pass else ("train",)
        scale = jax.process_count()
        segs = [np.asarray(batch[v]["segment_ids"]) for v in views]
        self._counts[step] = (sum(int((s != 0).sum()) for s in segs) * scale, sum(s.size for s in segs) * scale)
        self._started[step] = time.perf_counter()
        if self._last_step is None:
            self._last_step = step - 1

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def step_seconds(self, step: int) -> float | None:
        """Wall time of one step not yet reported (None if unknown), e.g. the first step with its compilation."""
        if step not in self._started:
            return None
        return self._started.get(step + 1, time.perf_counter()) - self._started[step]

    def running_for(self, step: int) -> float:
        """Seconds since the loop took step `step`'s batch (0 if it has not)."""
        return time.perf_counter() - self._started[step] if step in self._started else 0.0

    def scalars(self, step_done: int) -> dict[str, float]:
        """Over the steps since the previous call, up to `step_done`: mean step time, tokens/s (real and computed
        slots), padding share, MFU."""
        now = time.perf_counter()
        first = (self._last_step or 0) + 1
        steps = [k for k in self._counts if k <= step_done]
        real = sum(self._counts[k][0] for k in steps)
        slots = sum(self._counts.pop(k)[1] for k in steps)
        begin = self._started.get(first, now)
        dt = max(self._started.get(step_done + 1, now) - begin - self._excluded, 1e-9)
        n = max(step_done - (self._last_step or 0), 1)
        for k in [k for k in self._started if k <= step_done]:
            del self._started[k]
        out = {"step_time_s": dt / n, "tokens_per_s": real / dt, "slots_per_s": slots / dt,
               "padding_frac": 1.0 - real / max(slots, 1), "model_tflops_per_step": self.model_flops / 1e12}
        if self.peak:
            out["mfu"] = self.model_flops * n / dt / self.peak
        self._last_step, self._excluded = step_done, 0.0
        return out


def make_throughput(config, model_cfg, layout, mesh, needs_costs: bool) -> Throughput:
    f = flops_lib.step_flops(model_cfg, layout, config.batch_size, needs_costs=needs_costs,
                             cost_layout=config.ssft.cost_layout)
    peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.logging.peak_flops)
    return Throughput(f.model, mesh.size, peak)


class InTrainingEval:
    """Greedy held-out evaluation on the current weights: Pass@1 with `<think1>` and with the coverage tag (the tag
    matched most often so far), native Cons@N, per-tag accuracy and, where the dataset has a strategy classifier,
    the tag -> strategy mutual information. Its sampling seeds are its own: the training RNG is never touched."""

    def __init__(self, config, tokenizer, tags, shared_tag: bool):
        from ssft_jax import datasets

        self.config, self.tokenizer, self.tags, self.shared_tag = config, tokenizer, tags, shared_tag
        spec = datasets.get_dataset(config.data.name)
        _, heldout = datasets.build_records(config)
        self.questions = list(heldout[: config.eval.num_questions])
        self.checker, self.classifier = spec.checker, spec.classifier
        if not self.questions:
            logging.warning("eval_every=%d but dataset %r has no held-out questions: no evaluation during training",
                            config.eval_every, config.data.name)

    def __call__(self, model_cfg, params, tag_counts) -> dict[str, Any]:
        if not self.questions:
            return {}
        from ssft_jax import evaluate

        e = self.config.eval
        res = evaluate.evaluate_model(
            model_cfg, params, self.tokenizer, self.tags, self.questions, self.checker, classifier=self.classifier,
            temperature=0.0, max_new_tokens=e.max_new_tokens or self.config.data.max_trace_len,
            shared_tag=self.shared_tag, tag_counts=list(map(int, tag_counts)) if np.sum(tag_counts) else None,
            batch_questions=e.batch_questions, seed=self.config.seed)
        m = res.metrics
        # Names without '@': TensorBoard rewrites those.
        out = {"eval/pass1_think1": m["pass@1"]["value"], "eval/consN_native": m["cons@N_native"],
               "eval/per_tag_accuracy": [p["accuracy"] for p in m["per_tag"]], "eval/seconds": m["seconds"]}
        if "pass@1_coverage" in m:
            out["eval/pass1_coverage"] = m["pass@1_coverage"]["value"]
        if "strategy" in m:
            out["eval/mi_frac_logM"] = m["strategy"]["mutual_information_frac_logM"]
            out["eval/distinct_strategies"] = m["strategy"]["distinct_strategies_first_sample"]
        return out
