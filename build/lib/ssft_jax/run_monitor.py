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

    The loop dispatches step k+1 before it reads step k's metrics. Step k ends when its metrics are ready: if the
    loop has to wait for them (`finished(k, was_ready=False)`, an asynchronous backend), when the wait returns; if
    they were ready already (the CPU often runs a step inline in the dispatching call), no later than the moment the
    loop took step k+1's batch. Timing from one report to the next instead gave a step reported right after its
    predecessor (log_every=1 before a checkpoint, the last step) ~0 s and the step before it twice its time. Time
    spent in in-training evaluation is taken out (`exclude`); the run's first step holds the compilation (the
    trainer reports it on its own line, `step_seconds`)."""

    def __init__(self, model_flops_per_step: float, num_devices: int, peak_per_device: float | None):
        self.model_flops = model_flops_per_step
        self.peak = peak_per_device * num_devices if peak_per_device else None
        self._counts: dict[int, tuple[int, int]] = {}  # step -> (real tokens, computed slots)
        self._started: dict[int, float] = {}  # step -> when the loop took its batch
        self._ended: dict[int, float] = {}  # step -> when it was known to have finished
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

    def finished(self, step: int, *, was_ready: bool) -> None:
        """Step `step`'s metrics are on the host; `was_ready`: they were ready before the loop asked for them."""
        now = time.perf_counter()
        self._ended[step] = min(now, self._started.get(step + 1, now)) if was_ready else now

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def step_seconds(self, step: int) -> float | None:
        """Wall time of one finished step from when the loop took its batch (the first step: with compilation)."""
        if step not in self._started or step not in self._ended:
            return None
        return self._ended[step] - self._started[step]

    def scalars(self, step_done: int) -> dict[str, float]:
        """Over the steps since the previous call, up to `step_done` (finished): mean step time, tokens/s (real and
        computed slots), padding share, MFU."""
        now = time.perf_counter()
        last = self._last_step or 0
        begin = self._ended.get(last, self._started.get(last + 1, now))
        end = self._ended.get(step_done, now)
        steps = [k for k in self._counts if k <= step_done]
        real = sum(self._counts[k][0] for k in steps)
        slots = sum(self._counts.pop(k)[1] for k in steps)
        dt = max(end - begin - self._excluded, 1e-9)
        n = max(step_done - last, 1)
        for table in (self._started, self._ended):
            for k in [k for k in table if k < step_done]:
                del table[k]
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
