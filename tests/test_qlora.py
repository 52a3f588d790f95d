"""QLoRA (`lora.base_quant`, ssft_jax/quant.py): the frozen base's projections int8 / nf4, dequantized per layer in
the scan; round-trip error bounds, the trainer (adapters-only gradients, exact resume, merged export), the loader
hook (the plan against XLA: tests/test_memory_plan.py, the LoRA compile test's int8 case)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import config as config_lib, hf_io, lora, model as M, quant, train

# The NF4 levels (QLoRA, appendix E): the largest gap, between -1 and the next level, bounds the rounding error.
NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2


@pytest.mark.parametrize("name,shape", [("q_proj", (2, 128, 4, 16)), ("o_proj", (2, 4, 64, 96)),
                                        ("down_proj", (3, 96, 64))])
def test_round_trip_error_is_within_half_a_quantization_step(name, shape):
    w = np.random.default_rng(0).standard_t(5, size=shape).astype(np.float32) * 0.02  # heavy tails, like weights
    n_in = quant.INPUT_DIMS.get(name, 1)
    ins = tuple(range(1, 1 + n_in))
    for mode in ("int8", "nf4"):
        q, s = quant.quantize_stacked(w, name, mode)
        assert q.shape == w.shape and s.shape == quant.scale_shape(name, w.shape, mode)
        assert q.dtype == (np.int8 if mode == "int8" else jnp.uint4)
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        back = np.asarray(quant.dequantize(quant.place_quantized(
            q, s, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), mode)))
        err = np.abs(back - w)
        if mode == "int8":  # per output unit: |err| <= absmax over its inputs / 127 / 2
            bound = np.max(np.abs(w), axis=ins, keepdims=True) / 127 / 2
        else:  # per block of NF4_BLOCK inputs along the last input axis: |err| <= absmax * the largest half gap
            block = quant.NF4_BLOCK if shape[n_in] % quant.NF4_BLOCK == 0 else shape[n_in]
            blocks = w.reshape(*shape[:n_in], shape[n_in] // block, block, *shape[n_in + 1:])
            absmax = np.max(np.abs(blocks), axis=n_in + 1, keepdims=True)
            bound = np.broadcast_to(absmax, blocks.shape).reshape(shape) * NF4_HALF_GAP
        assert np.all(err <= bound * (1 + 1e-5) + 1e-9), (mode, float((err - bound).max()))
        rel = float(np.sqrt((err ** 2).mean() / (w ** 2).mean()))
        assert rel < (0.02 if mode == "int8" else 0.15), (mode, rel)  # t(5) weights: measured 0.011 / 0.10
        assert quant.layer_weight_bytes(name, shape, mode) == (q.size if mode == "int8" else q.size // 2) + s.size * 4


def qlora_config(mode="nf4", **kw):
    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.lora.update(enabled=True, rank=4, alpha=8.0, base_dtype="float32", base_quant=mode, **kw)
    c.optim.update(learning_rate=1e-2, warmup_frac=0.0)
    return c


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_qlora_run_trains_adapters_only_resumes_exactly_and_exports_the_merge(tmp_path, mode):
    c = qlora_config(mode)
    c.num_steps = 4
    whole = train.run(c, tmp_path / "whole", progress=False)
    spec, frozen, params, cfg = whole["lora"], whole["frozen"], whole["state"]["params"], whole["model_config"]
    assert spec.base_quant == mode and whole["compiles"] == 1
    assert set(params) == {"lora", "tag_embedding"}  # the state (gradients, moments, checkpoints): adapters + tag rows
    for name in quant.PROJECTIONS:  # the base: quantized projections, nothing else quantized
        assert quant.is_quantized(frozen["layers"][name])
    assert not quant.is_quantized(frozen["embedding"])
    # The base is what a fresh quantization of the same initial weights gives: training never touched it.
    fresh = lora.freeze(spec, train_init_params(c))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(params["lora"]["q_proj"]["b"]).max()) > 0

    # resume: 2 steps, stop, 2 more == 4 uninterrupted, bit for bit
    half = train.run(c, tmp_path / "resumed", progress=False, stop_after=2)
    assert half["final_step"] == 2
    rest = train.run(c, tmp_path / "resumed", progress=False)
    assert rest["start_step"] == 2 and rest["losses"] == whole["losses"]
    for a, b in zip(jax.tree.leaves(rest["state"]["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # the merged export (dequantized base + adapters, fp32) == the adapted forward on the dequantized base
    toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 15)))
    toks = toks.at[:, 4].set(spec.tag_token_ids[2])
    adapted = M.forward(cfg, lora.adapted_params(cfg, spec, frozen, params), toks)
    cfg2, exported = hf_io.load_hf_params(whole["export_dir"])
    assert float(jnp.abs(M.forward(cfg2, exported, toks) - adapted).max()) <= 1e-4
    dense = lora.adapted_params(cfg, spec, quant.dequantize_tree(frozen, jnp.float32), params)
    assert float(jnp.abs(M.forward(cfg, dense, toks) - adapted).max()) <= 1e-5


def train_init_params(c):
    from ssft_jax import assembly, mesh as mesh_lib
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return assembly.build(c, mesh=mesh, params="load").params


def test_gradients_reach_the_adapters_and_tag_rows_only():
    from ssft_jax import assembly, mesh as mesh_lib
    c = qlora_config("int8")
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    pieces = assembly.build(c, mesh=mesh, params="load")
    spec, frozen, trainable = assembly.split_lora(c, pieces.model_config, pieces.params, pieces.tokenizer,
                                                  pieces.tags, mesh)
    cfg = pieces.model_config
    toks = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 12)))

    def loss(trainable, frozen):
        return jnp.mean(M.forward(cfg, lora.adapted_params(cfg, spec, frozen, trainable), toks) ** 2)
    g_train = jax.grad(loss)(trainable, frozen)
    # B starts at 0, so at step 0 the loss moves with B (and the tag rows); A's gradient is B^T-weighted: 0
    assert all(float(jnp.abs(g_train["lora"][n]["b"]).max()) > 0 for n in spec.targets)
    assert float(jnp.abs(g_train["tag_embedding"]).max()) > 0
    # The base's quantized values are integers: no gradient exists for them (JAX refuses to differentiate them).
    with pytest.raises(TypeError, match="integer|int8"):
        jax.grad(loss, argnums=1)(trainable, frozen)


def test_bad_quant_mode_is_refused():
    c = qlora_config("int4")
    with pytest.raises(config_lib.ConfigError, match="lora.base_quant='int4'"):
        config_lib.validate(c, 1)


def test_the_loader_quantizes_an_hf_folder_on_the_host_as_quantizing_after_a_dense_load_would(tmp_path):
    from ssft_jax import mesh as mesh_lib

    from hf_fixtures import make_hf_model
    make_hf_model("qwen2_untied", tmp_path / "hf")
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg, dense = hf_io.load_hf_params(tmp_path / "hf", mesh=mesh)
    deltas = {}
    for mode in ("int8", "nf4"):
        _, loaded = hf_io.load_hf_params(tmp_path / "hf", mesh=mesh, place_layer_param=quant.host_quantizer(mode))
        after = quant.quantize_params(dense, mode)
        for name in quant.PROJECTIONS:
            assert quant.is_quantized(loaded["layers"][name])
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(loaded["embedding"]), np.asarray(dense["embedding"]))
        toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9)))
        deltas[mode] = float(jnp.abs(M.forward(cfg, loaded, toks) - M.forward(cfg, dense, toks)).max())
    assert 0 < deltas["int8"] < deltas["nf4"], deltas  # 8 bits per weight err less than 4 (the quality: the bench)


def test_chunked_host_quantization_equals_one_chunk(monkeypatch):
    w = np.random.default_rng(1).normal(size=(2, 4, 64, 96)).astype(np.float32)  # o_proj: [L, heads, head_dim, D]
    for mode in ("int8", "nf4"):
        whole = quant.quantize_stacked(w, "o_proj", mode)
        monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 4 * 64 * 10)  # 10 output units a chunk: 10 chunks per layer
        assert len(quant._chunks(w.shape[1:], 2)) == 10
        chunked = quant.quantize_stacked(w, "o_proj", mode)
        monkeypatch.undo()
        for a, b in zip(whole, chunked):
            np.testing.assert_array_equal(a, b)
