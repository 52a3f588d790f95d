"""LoRA through the trainer: adapters-only state and checkpoints, exact resume, merged + PEFT exports, loading."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import assembly, checkpoint as ckpt_lib, config as config_lib, hf_io, lora, model as M, train


def lora_config(**lora_kw):
    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.lora.update(enabled=True, rank=4, alpha=8.0, base_dtype="float32", **lora_kw)
    c.optim.update(learning_rate=1e-2, warmup_frac=0.0)
    return c


def test_a_lora_run_trains_the_adapters_only_and_exports_merged_and_peft(tmp_path):
    c = lora_config()
    c.num_steps = 4
    s = train.run(c, tmp_path, progress=False)
    assert s["compiles"] == 1 and all(np.isfinite(list(s["losses"].values())))
    spec, frozen, params = s["lora"], s["frozen"], s["state"]["params"]
    cfg = s["model_config"]
    assert set(params) == {"lora", "tag_embedding"}  # demo: special-mode tags, tied embedding
    assert len(spec.tag_token_ids) == c.ssft.num_tags
    assert float(jnp.abs(params["lora"]["q_proj"]["b"]).max()) > 0  # the adapters moved
    # The tag rows started equal (the mean embedding) and SSFT pulled them apart.
    rows = np.asarray(params["tag_embedding"])
    assert np.abs(rows - rows[0]).max() > 1e-4
    # The checkpoint holds the adapters' state (and the config naming the base), nothing base-sized.
    n_train = lora.trainable_count(cfg, spec)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
    try:
        step = ckpt.latest_step()
        saved = ckpt_lib.read_json_item(tmp_path / "checkpoints" / str(step) / "config")
        import orbax.checkpoint as ocp
        meta = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / str(step) / "state")
    finally:
        ckpt.close()
    leaves = jax.tree.leaves(getattr(meta, "item_metadata", meta), is_leaf=lambda x: hasattr(x, "shape"))
    n_saved = sum(int(np.prod(x.shape)) for x in leaves if hasattr(x, "shape"))
    base_count = sum(x.size for x in jax.tree.leaves(frozen))
    assert 3 * n_train <= n_saved < 3 * n_train + 64 < base_count  # params + Adam mu, nu (+ counters)
    assert saved["lora"]["enabled"] and saved["model"]["hf_dir"] == c.model.hf_dir

    toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 15)))
    toks = toks.at[:, 4].set(spec.tag_token_ids[2])
    adapted = M.forward(cfg, lora.adapted_params(cfg, spec, frozen, params), toks)
    cfg2, exported = hf_io.load_hf_params(s["export_dir"])
    assert float(jnp.abs(M.forward(cfg2, exported, toks) - adapted).max()) <= 1e-5
    lm = assembly.load_for_generation(workdir=tmp_path)  # from the checkpoint: base re-read, adapters merged
    assert lm.source.startswith("checkpoint:")
    assert float(jnp.abs(M.forward(lm.cfg, lm.params, toks) - adapted).max()) <= 1e-5
    pc = json.loads((tmp_path / "lora_adapter" / "adapter_config.json").read_text())
    assert pc["r"] == 4 and pc["trainable_token_indices"] == {"embed_tokens": list(spec.tag_token_ids)}
    assert (tmp_path / "lora_adapter" / "tokenizer.json").is_file()
    spec2, back = lora.load_peft_adapter(tmp_path / "lora_adapter", cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)


def test_lora_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    c = lora_config(dropout=0.1)  # dropout masks come from the step rng: restored with the state
    c.num_steps = 6
    c.checkpoint.every_steps = 2
    c.export_hf = False
    full = train.run(c, tmp_path / "full", progress=False)
    part = train.run(c, tmp_path / "resumed", progress=False, stop_after=3)
    assert part["final_step"] == 3
    rest = train.run(c, tmp_path / "resumed", progress=False)
    assert rest["start_step"] == 3
    for step in (4, 5, 6):
        assert rest["losses"][step] == full["losses"][step]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 rest["state"]["params"], full["state"]["params"])


def test_text_mode_tags_train_no_embedding_rows(tmp_path):
    c = lora_config()
    c.ssft.tag_mode = "text"
    c.num_steps = 2
    c.export_hf = False
    s = train.run(c, tmp_path, progress=False)
    assert set(s["state"]["params"]) == {"lora"} and s["lora"].tag_token_ids == ()


@pytest.mark.parametrize("field,value,message", [
    ("lora.rank", 0, "lora.rank=0"),
    ("lora.targets", ("q_proj", "qkv"), "lora.targets"),
    ("lora.dropout", 1.0, "lora.dropout=1.0"),
    ("lora.base_dtype", "int8", "lora.base_dtype='int8'"),
])
def test_bad_lora_settings_are_refused(field, value, message):
    c = lora_config()
    section, key = field.split(".")
    with c.unlocked():
        c[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c, 1)


def test_lora_on_a_2x2_mesh_shards_the_adapters_and_matches_one_device(tmp_path):
    assert jax.device_count() >= 4  # conftest's fake CPU devices
    runs = {}
    for name, (d, f) in (("one", (1, 1)), ("mesh", (2, 2))):
        c = lora_config()
        c.ssft.method = "sft_mixed"  # no matching ties: the same updates on any mesh, up to reduction order
        c.mesh.update(data=d, fsdp=f, tensor=1, num_devices=d * f)
        c.num_steps, c.export_hf = 3, False
        runs[name] = train.run(c, tmp_path / name, progress=False)
    a = runs["mesh"]["state"]["params"]["lora"]["q_proj"]["a"]  # [L, D, r]: D ('embed') split over fsdp
    assert a.sharding.spec[1] == "fsdp" and a.addressable_shards[0].data.shape[1] == a.shape[1] // 2
    for step in (1, 2, 3):
        np.testing.assert_allclose(runs["mesh"]["losses"][step], runs["one"]["losses"][step], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5),
                 runs["mesh"]["state"]["params"], runs["one"]["state"]["params"])
