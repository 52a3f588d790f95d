"""What a server sees in an HF export: run by tests/test_hf_export_serving.py in-process under the pinned transformers
5 and, as a script in a subprocess, under transformers 4.57 (a side install first on PYTHONPATH), so that both lines
are probed by the same code and compared with our own tokenizer, checkpoint and sampler by the test.

    python tests/hf_serve_probe.py SPEC.json OUT_DIR      # writes OUT_DIR/result.json (+ logits_<case>.npy)

SPEC.json: {"cases": [{"name", "folder", "texts", "messages", "num_tags", "logits_tag", "max_new_tokens"}]}
(max_new_tokens 0: no generation; a folder without config.json: the tokenizer only). Only
transformers, tokenizers and torch are imported: nothing of ssft_jax, whose pins are transformers 5's.
"""
from __future__ import annotations

import json
import pathlib
import sys

FORKING_TAG_VARIABLE = "forking_tag"  # tokenization.FORKING_TAG_VARIABLE (not imported: see the docstring)


def probe(case: dict, out_dir: pathlib.Path) -> dict:
    """Load case["folder"] with AutoConfig / AutoTokenizer / AutoModelForCausalLM and record what a server would use."""
    import torch

    # One intra-op thread: beside JAX's threads (in-process) or other test processes on the 2 CI cores, torch's
    # second thread made SmolLM2's forward 6x slower here (3.5 s against 0.6 s), not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe(case, out_dir)
    finally:
        torch.set_num_threads(threads)


def _probe(case: dict, out_dir: pathlib.Path) -> dict:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = case["folder"]
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    out = {"transformers": transformers.__version__, "tokenizer_class": type(tok).__name__, "len": len(tok),
           "eos_token": tok.eos_token, "ids": [], "ids_split": [], "decoded": []}
    for text in case["texts"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out["ids"].append(list(ids))
        out["ids_split"].append(list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]))
        out["decoded"].append(tok.decode(ids))
    # The serving prompt: the exported chat template, opened with each tag (forking_tag = the number in its name).
    out["prompts"] = []
    for k in range(1, case["num_tags"] + 1):
        text = tok.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True,
                                       **{FORKING_TAG_VARIABLE: k})
        out["prompts"].append(list(tok(text, add_special_tokens=False)["input_ids"]))
    out["prompt_without_tag"] = list(tok(tok.apply_chat_template(case["messages"], tokenize=False,
                                                                 add_generation_prompt=True),
                                         add_special_tokens=False)["input_ids"])
    if not (pathlib.Path(folder) / "model.safetensors").is_file():
        return out

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    out["config"] = {k: getattr(config, k, None) for k in ("model_type", "vocab_size", "rope_theta",
                                                            "tie_word_embeddings", "num_hidden_layers")}
    out["config"]["torch_dtype"] = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None))
    rope = getattr(config, "rope_parameters", None) or {}
    # Where each line really takes theta from: 5.x rope_parameters, 4.x the top-level attribute.
    out["config"]["effective_rope_theta"] = (rope.get("rope_theta") if transformers.__version__.startswith("5")
                                             else getattr(config, "rope_theta", None))
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    # The inverse frequencies transformers actually rotates with (not just what the config says).
    out["inv_freq_head"] = [float(x) for x in model.model.rotary_emb.inv_freq[:4]]
    with torch.no_grad():
        prompt = out["prompts"][case["logits_tag"] - 1]
        logits = model(torch.tensor([prompt])).logits[0].numpy().astype(np.float32)
        np.save(out_dir / f"logits_{case['name']}.npy", logits)
        if case["max_new_tokens"]:
            out["greedy"] = _greedy(model, out["prompts"], case["max_new_tokens"])
    out["generation_eos"] = model.generation_config.eos_token_id
    return out


def _greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, cut after its first stop token (kept, as our sampler does).
    Prompts of one length (special-mode tags are one token each) go as one batch: no padding, one generate call."""
    import torch

    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    batches = [prompts] if len({len(p) for p in prompts}) == 1 else [[p] for p in prompts]
    out = []
    for batch in batches:
        x = torch.tensor(batch)
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1)
        for row in gen[:, x.shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            out.append([int(t) for t in row[:cut]])
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(pathlib.Path(argv[0]).read_text())
    out_dir = pathlib.Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {c["name"]: probe(c, out_dir) for c in spec["cases"]}
    (out_dir / "result.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
