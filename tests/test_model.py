"""The decoder against transformers' PyTorch implementation, and the HF folder round trip."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ssft_jax import hf_io, mesh as mesh_lib, model as M  # noqa: E402

from hf_fixtures import FAMILIES, make_hf_model  # noqa: E402

TOL = 1e-4  # f32, max abs error on logits


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    torch_model = make_hf_model(request.param, folder)
    cfg, params = hf_io.load_hf_params(folder)
    return request.param, folder, torch_model, cfg, params


def torch_logits(torch_model, tokens, position_ids=None):
    with torch.no_grad():
        kw = {} if position_ids is None else {"position_ids": torch.tensor(position_ids)}
        return torch_model(torch.tensor(tokens), **kw).logits.numpy()


def test_logits_match_transformers(family):
    name, _, torch_model, cfg, params = family
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 40))
    ref = torch_logits(torch_model, tokens)
    ours = np.asarray(jax.jit(lambda p, t: M.forward(cfg, p, t))(params, jnp.asarray(tokens)))
    assert ref.std() > 0.3, "logits too flat to make the comparison meaningful"
    err = np.abs(ref - ours).max()
    print(f"parity {name}: max abs logit error {err:.2e}")
    assert err <= TOL


def test_config_features_per_family(family):
    name, _, _, cfg, params = family
    assert cfg.attention_bias == name.startswith("qwen2")
    assert cfg.qk_norm == (name == "qwen3")
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    if name == "llama3":
        assert cfg.rope_params["rope_type"] == "llama3"


def test_packed_segments_do_not_see_each_other(family):
    _, _, torch_model, cfg, params = family
    rs = np.random.RandomState(1)
    a, b, c = (rs.randint(0, cfg.vocab_size, n) for n in (11, 7, 5))
    row = np.concatenate([a, b, c, np.zeros(3, int)])[None]
    seg = np.concatenate([np.full(11, 1), np.full(7, 2), np.full(5, 3), np.zeros(3, int)])[None]
    pos = np.concatenate([np.arange(11), np.arange(7), np.arange(5), np.zeros(3, int)])[None]
    packed = np.asarray(M.forward(cfg, params, jnp.asarray(row), jnp.asarray(seg), jnp.asarray(pos)))
    starts = [0, 11, 18]
    for seq, s in zip((a, b, c), starts):
        ref = torch_logits(torch_model, seq[None])[0]
        assert np.abs(packed[0, s:s + len(seq)] - ref).max() <= TOL


def test_kv_cache_decoding_equals_full_forward(family):
    _, _, _, cfg, params = family
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 16)))
    full = M.forward(cfg, params, tokens)
    cache = M.init_cache(cfg, batch=2, max_len=24)
    step = jax.jit(lambda p, t, c: M.forward(cfg, p, t, cache=c))
    logits, cache = step(params, tokens[:, :9], cache)  # prefill
    outs = [logits]
    for t in range(9, 16):  # one token at a time
        logits, cache = step(params, tokens[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=TOL)
    assert np.all(np.asarray(cache["index"]) == 16)


def test_kv_cache_rows_at_different_offsets(family):
    """Rows of one batch may have prompts of different lengths (right-padded, per-row fill index)."""
    _, _, _, cfg, params = family
    rs = np.random.RandomState(3)
    long, short = rs.randint(0, cfg.vocab_size, 10), rs.randint(0, cfg.vocab_size, 6)
    cache = M.init_cache(cfg, batch=2, max_len=16)
    prompt = np.stack([long, np.concatenate([short, np.zeros(4, int)])])
    seg = np.stack([np.ones(10, int), np.concatenate([np.ones(6, int), np.zeros(4, int)])])
    _, cache = M.forward(cfg, params, jnp.asarray(prompt), jnp.asarray(seg), cache=cache)
    cache["index"] = jnp.asarray([10, 6], jnp.int32)  # the short row continues right after its last real token
    nxt = rs.randint(0, cfg.vocab_size, (2, 1))
    logits, _ = M.forward(cfg, params, jnp.asarray(nxt), jnp.ones((2, 1), jnp.int32), cache=cache)
    for row, seq in enumerate((long, short)):
        full = M.forward(cfg, params, jnp.asarray(np.concatenate([seq, nxt[row]])[None]))
        np.testing.assert_allclose(logits[row, 0], full[0, -1], atol=TOL)


def test_export_round_trip_is_exact(family, tmp_path):
    name, _, torch_model, cfg, params = family
    out = hf_io.save_hf_folder(tmp_path / "export", cfg, params, eos_token_ids=[5, 7])
    cfg2, params2 = hf_io.load_hf_params(out)
    assert cfg2 == cfg.replace(eos_token_id=[5, 7])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    # ... and transformers reads the exported folder into the same model as the original.
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for (n1, p1), (n2, p2) in zip(sorted(torch_model.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert n1 == n2
        np.testing.assert_array_equal(p1.numpy(), p2.numpy())
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [5, 7]


def test_sharded_export_and_load(tmp_path):
    folder = tmp_path / "src"
    make_hf_model("qwen2_untied", folder)
    cfg, params = hf_io.load_hf_params(folder)
    out = hf_io.save_hf_folder(tmp_path / "sharded", cfg, params, max_shard_bytes=20_000)
    index = json.loads((out / hf_io.SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    _, params2 = hf_io.load_hf_params(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def _rewrite_checkpoint(folder, edit):
    from safetensors.numpy import load_file, save_file
    path = folder / hf_io.SAFE_SINGLE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "fault,expected",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*model.layers.1.mlp.up_proj.weight"),
        (
            lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
            "unexpected tensor.*mlp.extra",
        ),
        (
            lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros((64, 32), np.float32)}),
            "unexpected tensor.*layers.7",
        ),
        (lambda t: t.update({"model.norm.weight": np.zeros(31, np.float32)}), "model.norm.weight.*shape"),
        (
            lambda t: t.update({"lm_head.weight": np.zeros((97, 32), np.float32)}),
            "unexpected tensor.*lm_head.*tie_word_embeddings",
        ),
    ],
)
def test_strict_key_accounting(tmp_path, fault, expected):
    make_hf_model("qwen2_tied", tmp_path)
    _rewrite_checkpoint(tmp_path, fault)
    with pytest.raises(hf_io.CheckpointKeyError, match=expected):
        hf_io.load_hf_params(tmp_path)


def test_unsupported_configs_are_refused():
    base = dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        M.ModelConfig.from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(NotImplementedError, match="sliding_window"):
        M.ModelConfig.from_hf({**base, "use_sliding_window": True})
    with pytest.raises(NotImplementedError, match="yarn"):
        M.ModelConfig.from_hf({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        M.ModelConfig.from_hf({**base, "num_key_value_heads": 3})


def test_load_onto_8_device_mesh_matches_single_device(tmp_path):
    make_hf_model("qwen2_untied", tmp_path)
    cfg, params1 = hf_io.load_hf_params(tmp_path)
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    _, params8 = hf_io.load_hf_params(tmp_path, mesh=mesh)
    assert params8["layers"]["q_proj"].sharding.spec == jax.P(None, "fsdp", "tensor", None)
    # vocab 97 does not divide over tensor=2, so that dim is replicated rather than padded.
    assert params8["embedding"].sharding.spec == jax.P(None, "fsdp")
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 8)))
    tokens8 = jax.device_put(tokens, mesh_lib.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh):
        out8 = jax.jit(lambda p, t: M.forward(cfg, p, t))(params8, tokens8)
    np.testing.assert_allclose(out8, M.forward(cfg, params1, tokens), atol=TOL)


def test_bf16_compute_and_remat(tmp_path):
    make_hf_model("llama3", tmp_path)
    cfg, params = hf_io.load_hf_params(tmp_path)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)))
    ref = M.forward(cfg, params, tokens)
    bf16 = M.forward(cfg.replace(dtype="bfloat16"), params, tokens)
    assert bf16.dtype == jnp.float32 and np.abs(bf16 - ref).max() < 0.1

    def loss(p, c):
        return M.forward(c, p, tokens).mean()
    g_ref = jax.grad(loss)(params, cfg)
    for policy in ("full", "dots"):
        g = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat=policy))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, g_ref)


def test_resize_vocab_initialises_new_rows_at_mean():
    cfg = M.ModelConfig(vocab_size=10, tie_word_embeddings=False)
    params = M.init_params(cfg)
    cfg2, p2 = M.resize_vocab(cfg, params, 13)
    assert cfg2.vocab_size == 13 and p2["embedding"].shape == (13, cfg.hidden_size)
    np.testing.assert_allclose(p2["embedding"][12], params["embedding"].mean(0), atol=1e-7)
    np.testing.assert_allclose(p2["lm_head"][:, 11], params["lm_head"].mean(1), atol=1e-7)
    with pytest.raises(ValueError, match="shrink"):
        M.resize_vocab(cfg, params, 5)


def test_params_carry_logical_axes():
    shapes, axes = M.abstract_params(M.ModelConfig(attention_bias=True, qk_norm=True))
    assert axes["layers"]["q_proj"] == ("layers", "embed", "heads", "head_dim")
    flat_s = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for path, s in flat_s:
        a = axes
        for k in path:
            a = a[k.key]
        assert len(a) == len(s.shape), path


def test_shared_prefix_equals_repeating_the_prompt(family):
    """One row [prompt | cont1 | cont2]: each continuation reads the prompt and itself, like two separate rows."""
    _, _, _, cfg, params = family
    rs = np.random.RandomState(4)
    prompt, c1, c2 = (rs.randint(0, cfg.vocab_size, n) for n in (9, 5, 6))
    row = np.concatenate([prompt, c1, c2])[None]
    seg = np.concatenate([np.full(9, 1), np.full(5, 2), np.full(6, 3)])[None]
    prefix = np.concatenate([np.zeros(9, int), np.full(5, 1), np.full(6, 1)])[None]
    pos = np.concatenate([np.arange(9), 9 + np.arange(5), 9 + np.arange(6)])[None]
    shared = np.asarray(M.forward(cfg, params, jnp.asarray(row), jnp.asarray(seg), jnp.asarray(pos),
                                  prefix_segment_ids=jnp.asarray(prefix)))
    for cont, start in ((c1, 9), (c2, 14)):
        ref = np.asarray(M.forward(cfg, params, jnp.asarray(np.concatenate([prompt, cont])[None])))
        np.testing.assert_allclose(shared[0, start:start + len(cont)], ref[0, 9:], atol=TOL)
    np.testing.assert_allclose(
        shared[0, :9], np.asarray(M.forward(cfg, params, jnp.asarray(prompt[None])))[0], atol=TOL
    )


def test_chunked_attention_equals_dense(family):
    _, _, _, cfg, params = family
    rs = np.random.RandomState(5)
    tokens = jnp.asarray(rs.randint(0, cfg.vocab_size, (2, 32)))
    seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 16 + [0] * 4], 2, 0))
    prefix = jnp.asarray(np.repeat([[0] * 12 + [1] * 16 + [0] * 4], 2, 0))
    dense = M.forward(cfg, params, tokens, seg, prefix_segment_ids=prefix)
    chunked_cfg = cfg.replace(attention_chunk=8)
    chunked = jax.jit(lambda p: M.forward(chunked_cfg, p, tokens, seg, prefix_segment_ids=prefix))(params)
    np.testing.assert_allclose(chunked, dense, atol=TOL)
    g = lambda c: jax.grad(lambda p: M.forward(c, p, tokens, seg, prefix_segment_ids=prefix)[..., :5].sum())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g(chunked_cfg), g(cfg))
