"""Tiny random transformers (PyTorch) models of each supported family, saved as HF folders for parity tests."""
from __future__ import annotations

import pathlib

TINY = dict(
    initializer_range=0.2,
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    "qwen2_tied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "qwen2_untied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(tie_word_embeddings=True, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
}


def make_hf_model(family: str, folder: pathlib.Path, seed: int = 0, **overrides):
    """Build, randomise (biases and norms too, so they are exercised) and save a tiny model; returns it."""
    import torch
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, cfg_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    return model


# Qwen2.5's template without the tool-calling branches.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "Let me think step by step. The answer is 42.",
    "What is the capital of France? Paris is the capital of France.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system user assistant think <think> reasoning 0123456789 + - * / = ( ) < > | \n\n",
    "Solve 2+2. First, add the numbers: 2+2=4. So the answer is 4.",
]


def build_tiny_tokenizer(path, *, chatml=True, eos="<|im_end|>"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chatml else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    kwargs = dict(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token=eos if chatml else "<|endoftext|>")
    if chatml:
        kwargs["chat_template"] = QWEN2_TEMPLATE
    PreTrainedTokenizerFast(**kwargs).save_pretrained(path)
    from ssft_jax import tokenization
    return tokenization.load_tokenizer(path)


# ---------------------------------------------------------------------------------------------------------------
# transformers 4.57 beside the pinned 5.x: a side install (pip --target) that a subprocess puts first on PYTHONPATH
# ---------------------------------------------------------------------------------------------------------------

# The last 4.x line, with the tokenizers and huggingface_hub it requires (its wheel pins tokenizers<=0.23.0 and
# huggingface-hub<1.0, below ours); everything else it imports (torch, numpy, safetensors, regex, ...) comes from the
# main environment, hence --no-deps.
TRANSFORMERS4_PINS = ("transformers==4.57.6", "tokenizers==0.22.1", "huggingface-hub==0.36.0")


def transformers4_dir() -> pathlib.Path:
    """Where the side install lives: inside the venv (so `make clean` removes it), keyed by the pins."""
    import sys
    return pathlib.Path(sys.prefix) / "side" / ("-".join(p.replace("==", "-") for p in TRANSFORMERS4_PINS))


def ensure_transformers4() -> tuple[pathlib.Path | None, str]:
    """(the side folder, "") once installed (cached between runs), or (None, why) if PyPI cannot be reached.

    Any other failure raises: a broken install must fail the test, not skip it.
    """
    import fcntl
    import shutil
    import subprocess
    import sys
    import tempfile

    target = transformers4_dir()
    stamp = target / ".installed"
    if stamp.is_file():
        return target, ""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:  # two test processes (or make and a test) install it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file():
            return target, ""
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        r = subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp), *TRANSFORMERS4_PINS],
                           capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            with tempfile.TemporaryDirectory() as d:
                reach = subprocess.run([*pip, "download", "--no-deps", "-d", d, TRANSFORMERS4_PINS[0]],
                                       capture_output=True, text=True)
            if reach.returncode != 0:
                return None, f"PyPI unreachable (pip download {TRANSFORMERS4_PINS[0]} failed: {reach.stderr[-300:]})"
            raise RuntimeError(f"pip install --target {tmp} {' '.join(TRANSFORMERS4_PINS)} failed:\n{r.stderr[-2000:]}")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        stamp.write_text("\n".join(TRANSFORMERS4_PINS) + "\n")
    return target, ""


if __name__ == "__main__":  # `make setup`: python tests/hf_fixtures.py install-transformers4
    import sys
    if sys.argv[1:] != ["install-transformers4"]:
        raise SystemExit("usage: python tests/hf_fixtures.py install-transformers4")
    where, why = ensure_transformers4()
    print(where or f"transformers 4 not installed: {why}")
