"""LoRA (ssft_jax/lora.py): identity at init, gradients for the adapters only, merge, PEFT layout."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import hf_io, lora, losses, model as M

TAGS = (93, 94, 95, 96)  # the last rows of the tiny vocabulary play the added <thinkK> tokens


def tiny_cfg(**kw):
    base = dict(model_type="qwen2", attention_bias=True, vocab_size=97, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                tie_word_embeddings=False)
    return M.ModelConfig(**{**base, **kw})


def perturbed(cfg, spec, base, seed=1, scale=0.5):
    """Trainable params moved away from their init (B != 0, tag rows changed), as after some training."""
    t = lora.init_trainable(cfg, spec, base)
    leaves, tree = jax.tree.flatten(t)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) * (x.std() + 0.05)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("tied", [False, True])
def test_adapted_model_is_the_base_model_at_init_bit_exact(tied):
    cfg = tiny_cfg(tie_word_embeddings=tied)
    base = M.init_params(cfg, seed=0)
    spec = lora.LoraSpec(rank=4, alpha=8.0, tag_token_ids=TAGS, base_dtype="float32")
    trainable = lora.init_trainable(cfg, spec, base)
    assert set(trainable) == ({"lora", "tag_embedding"} | (set() if tied else {"tag_lm_head"}))
    assert all(float(jnp.abs(ab["a"]).max()) > 0 for ab in trainable["lora"].values())  # A random, B zero
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 17)))
    ref = jax.jit(lambda p: M.forward(cfg, p, tokens))(base)
    got = jax.jit(lambda f, t: M.forward(cfg, lora.adapted_params(cfg, spec, f, t), tokens))(
        lora.freeze(spec, base), trainable)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # ... and the adapters do change the model once B moves
    moved = perturbed(cfg, spec, base)
    out = M.forward(cfg, lora.adapted_params(cfg, spec, base, moved), tokens)
    assert float(jnp.abs(out - ref).max()) > 1e-3


def test_every_projection_is_adapted_and_merges_exactly():
    cfg = tiny_cfg()
    base = M.init_params(cfg, seed=0)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 9)))
    ref = M.forward(cfg, base, tokens)
    for name in lora.TARGET_MODULES:  # one target at a time: each one reaches the logits on its own
        spec = lora.LoraSpec(rank=2, alpha=2.0, targets=(name,), base_dtype="float32")
        moved = perturbed(cfg, spec, base)
        fused = M.forward(cfg, lora.adapted_params(cfg, spec, base, moved), tokens)
        assert float(jnp.abs(fused - ref).max()) > 1e-4, name
        merged = M.forward(cfg, lora.merge(cfg, spec, base, moved), tokens)
        np.testing.assert_allclose(np.asarray(fused), np.asarray(merged), atol=1e-5, rtol=0)


def test_unfused_projections_match_the_fused_ones(monkeypatch):
    cfg = tiny_cfg()
    base = M.init_params(cfg, seed=0)
    spec = lora.LoraSpec(rank=4, alpha=8.0, base_dtype="float32")
    moved = perturbed(cfg, spec, base)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 11)))
    params = lora.adapted_params(cfg, spec, base, moved)
    fused = M.forward(cfg, params, tokens)
    monkeypatch.setattr(M, "_fused_projections", lambda: False)
    unfused = M.forward(cfg, params, tokens)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(unfused), atol=1e-5, rtol=0)


def test_merged_weights_equal_the_adapted_forward_through_an_hf_export(tmp_path):
    cfg = tiny_cfg()
    base = M.init_params(cfg, seed=0)
    spec = lora.LoraSpec(rank=4, alpha=16.0, tag_token_ids=TAGS, base_dtype="float32")
    moved = perturbed(cfg, spec, base)
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 23)))
    adapted = M.forward(cfg, lora.adapted_params(cfg, spec, base, moved), tokens)
    hf_io.save_hf_folder(tmp_path, cfg, lora.merge(cfg, spec, base, moved))
    cfg2, loaded = hf_io.load_hf_params(tmp_path)
    assert "lora" not in loaded["layers"]
    err = float(jnp.abs(M.forward(cfg2, loaded, tokens) - adapted).max())
    assert err <= 1e-5, err


def test_gradients_and_optimizer_state_cover_the_adapters_only():
    import optax

    cfg = tiny_cfg()
    base = M.init_params(cfg, seed=0)
    spec = lora.LoraSpec(rank=4, alpha=8.0, tag_token_ids=TAGS, base_dtype="bfloat16")
    frozen = lora.freeze(spec, base)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen))
    trainable = lora.init_trainable(cfg, spec, base)
    rs = np.random.RandomState(5)
    toks = rs.randint(0, cfg.vocab_size, (3, 12))
    toks[:, 2] = TAGS[1]  # a tag token in the input and as a target: its embedding and head rows get gradients
    rows = {
        "tokens": jnp.asarray(toks[:, :-1]),
        "targets": jnp.asarray(toks[:, 1:]),
        "segment_ids": jnp.ones((3, 11), jnp.int32),
        "loss_mask": jnp.ones((3, 11), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(11), (3, 11)),
    }

    def loss(t):
        s, n = losses.set_loss_sums(cfg, lora.adapted_params(cfg, spec, frozen, t), rows, 0)
        return s / n
    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for name, g in grads["lora"].items():
        assert float(jnp.abs(g["b"]).max()) > 0, name  # B = 0 at init: only B moves first, as in PEFT
        np.testing.assert_array_equal(np.asarray(g["a"]), 0)
    assert float(jnp.abs(grads["tag_embedding"][1]).max()) > 0
    assert float(jnp.abs(grads["tag_lm_head"]).max()) > 0
    opt = optax.adam(1e-3)
    n_opt = sum(x.size for x in jax.tree.leaves(opt.init(trainable)))
    n_train = lora.trainable_count(cfg, spec)
    assert n_opt == 2 * n_train + 1  # mu, nu over the adapters (and a step count): nothing base-sized
    L, D, F, H, K, Dh, r = 2, 32, 48, 4, 2, 8, 4
    expected = L * r * ((D + H * Dh) + 2 * (D + K * Dh) + (H * Dh + D) + 2 * (D + F) + (F + D)) + 2 * len(TAGS) * D
    assert n_train == expected


def test_dropout_is_deterministic_from_the_rng_and_off_without_one():
    cfg = tiny_cfg()
    base = M.init_params(cfg, seed=0)
    spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.5, base_dtype="float32")
    moved = perturbed(cfg, spec, base)
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 9)))
    run = lambda rng: M.forward(cfg, lora.adapted_params(cfg, spec, base, moved, rng), tokens)
    plain = run(None)
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).max()) > 1e-4 and float(jnp.abs(a - plain).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(
        M.forward(cfg, lora.adapted_params(cfg, spec, base, moved), tokens)))


def test_peft_folder_round_trips():
    cfg = tiny_cfg()
    base = M.init_params(cfg, seed=0)
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "down_proj"), tag_token_ids=TAGS)
    moved = perturbed(cfg, spec, base)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        lora.save_peft_adapter(d, cfg, spec, moved, base_model="tiny-base")
        pc = json.loads(open(f"{d}/adapter_config.json").read())
        assert pc["base_model_name_or_path"] == "tiny-base" and pc["r"] == 4 and pc["lora_alpha"] == 8.0
        spec2, back = lora.load_peft_adapter(d, cfg)
    assert spec2.targets == spec.targets and spec2.tag_token_ids == TAGS
    for x, y in zip(jax.tree.leaves(moved), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family", ["qwen2_untied", "qwen2_tied", "llama3"])
def test_a_peft_adapter_folder_loads_in_transformers_and_peft_with_the_same_logits(family, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_fixtures import make_hf_model

    make_hf_model(family, tmp_path / "base")
    cfg, base = hf_io.load_hf_params(tmp_path / "base")
    tags = tuple(range(cfg.vocab_size - 3, cfg.vocab_size))
    spec = lora.LoraSpec(rank=4, alpha=12.0, tag_token_ids=tags, base_dtype="float32")
    moved = perturbed(cfg, spec, base, scale=1.0)
    lora.save_peft_adapter(tmp_path / "adapter", cfg, spec, moved, base_model=str(tmp_path / "base"))

    import transformers
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(torch_base, tmp_path / "adapter").eval()
    toks = np.random.RandomState(7).randint(0, cfg.vocab_size, (2, 19))
    toks[:, 3] = tags[0]
    with torch.no_grad():
        ref = model(torch.tensor(toks)).logits.numpy()
    ours = np.asarray(M.forward(cfg, lora.adapted_params(cfg, spec, base, moved), jnp.asarray(toks)))
    plain = np.asarray(M.forward(cfg, base, jnp.asarray(toks)))
    assert np.abs(ours - plain).max() > 1e-2  # the adapter matters, so agreeing with peft means something
    err = np.abs(ref - ours).max()
    print(f"peft {family}: max abs logit error {err:.2e}")
    assert err <= 1e-4
