"""GGUF -> HF conversion of SmolLM2-135M-Instruct (ssft_jax.gguf_convert)."""
import json

import numpy as np
import pytest

from ssft_jax import gguf_convert as gc

GGUF_DIR_NAME = gc.SMOLLM2_GGUF_NAME


@pytest.fixture(scope="module")
def hf_dir():
    return gc.ensure_smollm2_hf()


# ---------------------------------------------------------------- pure unit tests (no model)


@pytest.mark.parametrize("rows,n_head", [(576, 9), (192, 3), (16, 2)])
def test_unpermute_inverts_llama_cpp_permute(rows, n_head):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, 7)).astype(np.float32)
    permuted = gc.permute_qk(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gc.unpermute_qk(permuted, n_head), w)


def test_permute_matches_llama_cpp_formula():
    # convert_hf_to_gguf.py: within each head, rows [first half | second half] become interleaved.
    head_dim, n_head = 4, 2
    w = np.arange(n_head * head_dim, dtype=np.float32)[:, None]
    gguf_rows = gc.permute_qk(w, n_head)[:, 0].tolist()
    assert gguf_rows == [0, 2, 1, 3, 4, 6, 5, 7]


def _fake_gguf_tensors(num_layers=1, hidden=8, n_head=2, n_kv=1, ffn=12, vocab=10, tied=True):
    rng = np.random.default_rng(1)
    head_dim = hidden // n_head
    t = {
        "token_embd.weight": rng.standard_normal((vocab, hidden)),
        "output_norm.weight": rng.standard_normal((hidden,)),
    }
    if not tied:
        t["output.weight"] = rng.standard_normal((vocab, hidden))
    for i in range(num_layers):
        t.update({
            f"blk.{i}.attn_q.weight": rng.standard_normal((n_head * head_dim, hidden)),
            f"blk.{i}.attn_k.weight": rng.standard_normal((n_kv * head_dim, hidden)),
            f"blk.{i}.attn_v.weight": rng.standard_normal((n_kv * head_dim, hidden)),
            f"blk.{i}.attn_output.weight": rng.standard_normal((hidden, hidden)),
            f"blk.{i}.ffn_gate.weight": rng.standard_normal((ffn, hidden)),
            f"blk.{i}.ffn_up.weight": rng.standard_normal((ffn, hidden)),
            f"blk.{i}.ffn_down.weight": rng.standard_normal((hidden, ffn)),
            f"blk.{i}.attn_norm.weight": rng.standard_normal((hidden,)),
            f"blk.{i}.ffn_norm.weight": rng.standard_normal((hidden,)),
        })
    return t


@pytest.mark.parametrize("tied", [True, False])
def test_mapping_complete(tied):
    t = _fake_gguf_tensors(num_layers=2, tied=tied)
    hf = gc.map_gguf_tensors(t, num_layers=2, n_head=2, n_head_kv=1)
    assert set(hf) == set(gc.expected_hf_keys(2, tied))
    assert ("lm_head.weight" in hf) == (not tied)
    np.testing.assert_array_equal(hf["model.layers.1.mlp.down_proj.weight"], t["blk.1.ffn_down.weight"])
    np.testing.assert_array_equal(hf["model.layers.0.self_attn.v_proj.weight"], t["blk.0.attn_v.weight"])
    np.testing.assert_array_equal(
        hf["model.layers.0.self_attn.q_proj.weight"], gc.unpermute_qk(t["blk.0.attn_q.weight"], 2)
    )
    np.testing.assert_array_equal(
        hf["model.layers.0.self_attn.k_proj.weight"], gc.unpermute_qk(t["blk.0.attn_k.weight"], 1)
    )


@pytest.mark.parametrize("extra", ["rope_freqs.weight", "blk.0.attn_q.bias", "blk.1.ffn_up.weight"])
def test_mapping_rejects_unmapped_tensor(extra):
    t = _fake_gguf_tensors(num_layers=1)
    t[extra] = np.zeros((8,))
    with pytest.raises(gc.GGUFConversionError, match="no HF mapping") as e:
        gc.map_gguf_tensors(t, num_layers=1, n_head=2, n_head_kv=1)
    assert extra in str(e.value)


@pytest.mark.parametrize("drop,hf_key", [
    ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
])
def test_mapping_rejects_missing_tensor(drop, hf_key):
    t = _fake_gguf_tensors(num_layers=1)
    del t[drop]
    with pytest.raises(gc.GGUFConversionError, match="not produced") as e:
        gc.map_gguf_tensors(t, num_layers=1, n_head=2, n_head_kv=1)
    assert hf_key in str(e.value)


def test_untied_model_without_output_is_missing_lm_head():
    t = _fake_gguf_tensors(num_layers=1, tied=True)
    with pytest.raises(gc.GGUFConversionError, match="lm_head.weight"):
        gc.map_gguf_tensors(t, num_layers=1, n_head=2, n_head_kv=1, tie_word_embeddings=False)


def test_incomplete_folder_is_not_trusted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not gc.is_complete(tmp_path, "abc")
    (tmp_path / gc.MARKER_NAME).write_text(
        json.dumps({"fingerprint": "abc", "files": ["config.json", "model.safetensors"]})
    )
    assert not gc.is_complete(tmp_path, "abc")  # a listed file is missing
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert gc.is_complete(tmp_path, "abc")
    assert not gc.is_complete(tmp_path, "other")


def test_cache_root_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SSFT_JAX_CACHE", str(tmp_path))
    assert gc.default_cache_root() == tmp_path
    monkeypatch.delenv("SSFT_JAX_CACHE")
    assert gc.default_cache_root() == gc.pathlib.Path.home() / ".cache" / "ssft_jax"


def test_default_gguf_found_without_importing_package():
    p = gc.default_gguf_path()
    assert p.name == GGUF_DIR_NAME and p.stat().st_size > 50_000_000


# ---------------------------------------------------------------- the converted folder


def test_folder_contents(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        576,
        30,
        9,
        3,
    )
    assert cfg["intermediate_size"] == 1536 and cfg["vocab_size"] == 49152 and cfg["head_dim"] == 64
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 8192
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"]
    im_end = vocab.get("<|im_end|>")
    if im_end is None:
        im_end = next(
            t["id"]
            for t in json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]
            if t["content"] == "<|im_end|>"
        )
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert im_end in eos and cfg["eos_token_id"] in eos
    assert "<|im_start|>" in tok_cfg["chat_template"]
    marker = json.loads((hf_dir / gc.MARKER_NAME).read_text())
    assert marker["fingerprint"] == gc.gguf_fingerprint(gc.default_gguf_path())
    assert gc.is_complete(hf_dir, marker["fingerprint"])


def test_second_call_reuses_cache(hf_dir):
    st = hf_dir / "model.safetensors"
    before = st.stat().st_mtime_ns
    assert gc.ensure_smollm2_hf(hf_dir) == hf_dir
    assert gc.main(["--out", str(hf_dir)]) == 0
    assert st.stat().st_mtime_ns == before


def test_loads_in_transformers_pytorch(hf_dir):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(hf_dir), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()  # tied


def test_weights_match_transformers_gguf_loader(hf_dir):
    """transformers' own GGUF dequantize + reverse-permute gives identical tensors (q/k included)."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        meta_model = LlamaForCausalLM(AutoConfig.from_pretrained(str(hf_dir)))
    ref = load_gguf_checkpoint(str(gc.default_gguf_path()), return_tensors=True, model_to_load=meta_model)["tensors"]
    ours = load_file(str(hf_dir / "model.safetensors"))
    assert set(ref) == set(ours)  # tied: neither has lm_head.weight
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight"):
        assert np.abs(ref[k].float().numpy() - ours[k]).max() == 0.0, k
    worst = max(float(np.abs(ref[k].float().numpy() - ours[k]).max()) for k in ours)
    assert worst < 1e-6


def test_tokenizer_matches_transformers_gguf_tokenizer(hf_dir):
    pytest.importorskip("torch")  # transformers' GGUF reader imports torch
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gc.default_gguf_path().parent), gguf_file=GGUF_DIR_NAME)
    ours = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    assert len(ours) == len(ref) == 49152
    texts = [
        "The capital of France is Paris.",
        "  leading spaces, 12345 digits, 3.14159 and tabs\tand\n\nnewlines",
        "ünïcödé 日本語 🙂 emoji, code: def f(x):\n    return x**2",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    assert ours.convert_tokens_to_ids("<|im_end|>") == 2
    rendered = ours.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert rendered == ref.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.slow
def test_greedy_decode_knows_paris(hf_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
