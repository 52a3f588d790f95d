"""QLoRA's quality cost (`lora.base_quant`, ssft_jax/quant.py), on SmolLM2-135M-Instruct.

    python bench/bench_qlora.py [--texts 32] [--tokens 256] [--steps 12]
    python bench/bench_qlora.py --quick     # smoke run: 2 texts, the SSFT curve on the tiny from-scratch demo model

1. Logits: the base with its projections quantized (int8 per output channel; nf4 in blocks of 64) against the fp32
   base, on held-out GSM8K text (test questions with their reference solutions, `../shared/data/gsm8k/test.jsonl`,
   the last `--texts` rows): max and mean |logit difference| over every real token position, top-1 (argmax) agreement,
   and each model's next-token NLL of the text.
2. Training: a short SSFT run (LoRA r=16 on every projection, `configs/demo_real.py`: SmolLM2 on the synthetic
   styles task) on the fp32 base, the int8 base and the nf4 base: the matched NLL (`matched_nll`: the mean NLL of
   the traces under their matched tags) per step, same data order, seed and schedule; and the median step time.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ssft_jax import config as config_lib, hf_io, metrics_log, model as M, quant, tokenization  # noqa: E402
from ssft_jax.datasets import gsm8k  # noqa: E402

MODES = ("int8", "nf4")


def heldout_texts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (gsm8k.resolve_data_dir() / "test.jsonl").read_text().splitlines()]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows[-n:]]


def logit_table(texts: list[str], max_tokens: int) -> list[dict]:
    from ssft_jax.gguf_convert import ensure_smollm2_hf
    folder = ensure_smollm2_hf()
    tok = tokenization.load_tokenizer(folder)
    cfg, dense = hf_io.load_hf_params(folder)
    ids = [tok.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]
    T = max(len(i) for i in ids)
    tokens = np.zeros((len(ids), T), np.int32)
    seg = np.zeros((len(ids), T), np.int32)
    for b, i in enumerate(ids):
        tokens[b, : len(i)], seg[b, : len(i)] = i, 1
    fwd = jax.jit(lambda p: M.forward(cfg, p, jnp.asarray(tokens), jnp.asarray(seg)).astype(jnp.float32))
    real = seg.astype(bool)
    nxt = real[:, 1:]

    def nll(logits):
        lp = jax.nn.log_softmax(logits[:, :-1], -1)
        picked = np.take_along_axis(np.asarray(lp), tokens[:, 1:, None], -1)[..., 0]
        return float(-(picked * nxt).sum() / nxt.sum())

    base = np.asarray(fwd(dense))
    rows = [{"base": "fp32", "max_abs": 0.0, "mean_abs": 0.0, "top1": 1.0, "nll": nll(base)}]
    for mode in MODES:
        q = quant.quantize_params(dense, mode)
        lg = np.asarray(fwd(q))
        diff = np.abs(lg - base)[real]
        top1 = float((lg.argmax(-1) == base.argmax(-1))[real].mean())
        rows.append({"base": mode, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "top1": top1,
                     "nll": nll(lg), "logit_absmax": float(np.abs(base[real]).max())})
    return rows


def ssft_curve(mode: str, steps: int, quick: bool, workdir: pathlib.Path) -> dict:
    from ssft_jax import train
    c = config_lib.load_config("demo" if quick else "demo_real", "tiny" if quick else "")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.lora.update(enabled=True, rank=16, alpha=32.0, base_dtype="float32", base_quant=mode)
    c.optim.update(learning_rate=1e-3 if not quick else 1e-2, warmup_frac=0.0)
    c.update(num_steps=steps, log_every=1, export_hf=False)
    c.logging.tensorboard = False
    t0 = time.perf_counter()
    train.run(c, workdir / (mode or "dense"), progress=False)
    recs = sorted((r for r in metrics_log.read_metrics(workdir / (mode or "dense")) if "matched_nll" in r),
                  key=lambda r: r["step"])
    secs = [r["step_time_s"] for r in recs[1:] if r.get("step_time_s") is not None]  # the first step compiles
    return {"base": mode or "fp32", "matched_nll": [r["matched_nll"] for r in recs],
            "seconds": time.perf_counter() - t0, "step_s": float(np.median(secs)) if secs else float("nan")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--json", default="")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.texts, a.tokens, a.steps = 2, 64, 3
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    t0 = time.perf_counter()
    logits = logit_table(heldout_texts(a.texts), a.tokens)
    print(f"\nlogits: SmolLM2-135M-Instruct, {a.texts} held-out GSM8K test texts x <= {a.tokens} tokens "
          f"({time.perf_counter() - t0:.0f} s)")
    print("| base | max abs logit diff | mean abs logit diff | top-1 agreement | text NLL (nats/token) |")
    print("|---|---|---|---|---|")
    for r in logits:
        print(f"| {r['base']} | {r['max_abs']:.4f} | {r['mean_abs']:.4f} | {r['top1']:.4f} | {r['nll']:.4f} |")

    curves = []
    with tempfile.TemporaryDirectory() as wd:
        for mode in ("", *MODES):
            curves.append(ssft_curve(mode, a.steps, a.quick, pathlib.Path(wd)))
    model = "the tiny demo model" if a.quick else "SmolLM2-135M-Instruct, configs/demo_real.py"
    print(f"\nSSFT with LoRA r=16 ({model}), matched NLL per step (the set loss's matched traces)")
    print("| base | " + " | ".join(f"step {i + 1}" for i in range(a.steps)) + " | median step s |")
    print("|---|" + "---|" * (a.steps + 1))
    for c in curves:
        print(f"| {c['base']} | " + " | ".join(f"{x:.4f}" for x in c["matched_nll"]) + f" | {c['step_s']:.2f} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"logits": logits, "ssft": curves}, indent=2))


if __name__ == "__main__":
    main()
