"""Orbax checkpoints: state + data-iterator state + config, keep-N, restore onto another mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssft_jax import checkpoint as ckpt, mesh as mesh_lib, model as M

CFG = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8)


def _state(mesh):
    params = M.init_params(CFG)
    shapes, axes = M.abstract_params(CFG)
    params = jax.device_put(params, mesh_lib.tree_shardings(axes, shapes, mesh))
    opt_state = optax.adamw(1e-3).init(params)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.int32(7),
        "rng": jax.random.key_data(jax.random.key(3)),
    }


def test_save_restore_onto_a_different_mesh(tmp_path):
    mesh_a = mesh_lib.make_mesh(data=1, fsdp=4, tensor=2)
    state = _state(mesh_a)
    c = ckpt.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    c.save(7, state, data_state={"iter": {"next_index": 12}}, config={"lr": 0.1})
    c.wait()

    mesh_b = mesh_lib.make_mesh(data=2, fsdp=1, tensor=4)
    target = jax.tree.map(lambda x: x, _state(mesh_b))
    step, restored, data_state, config = c.restore(None, ckpt.abstract_like(target))[:4]
    assert step == 7 and data_state == {"iter": {"next_index": 12}} and config == {"lr": 0.1}
    q = restored["params"]["layers"]["q_proj"]
    assert q.sharding.mesh.shape == mesh_b.shape and q.sharding.spec == jax.P(None, None, "tensor", None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, restored)


def test_keep_n_and_latest(tmp_path):
    mesh = mesh_lib.make_mesh(data=8)
    state = _state(mesh)
    c = ckpt.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    for s in (1, 2, 3):
        c.save(s, state)
    c.wait()
    assert c.all_steps() == [2, 3] and c.latest_step() == 3


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ckpt.CheckpointError, match="not writable"):
        ckpt.Checkpointer(blocker / "ckpt")


def test_restore_without_checkpoint_errors(tmp_path):
    c = ckpt.Checkpointer(tmp_path / "empty")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        c.restore(None, {})


def test_orbax_private_attributes_we_read_still_exist(tmp_path):
    """`checkpoint.pending_commit_futures` reads orbax internals (no public API lists the background writes): if an
    orbax upgrade moves them, this fails here instead of a failed write silently racing its retry."""
    c = ckpt.Checkpointer(tmp_path / "ckpt", async_save=True)
    try:
        c.save(1, {"x": jnp.ones(3)})
        assert c._manager._checkpointer._async_manager._commit_futures is not None
        assert ckpt.pending_commit_futures(c._manager), "no background write futures found after an async save"
        c.wait()
    finally:
        c.close()


def test_slow_checkpoint_writes_hook(tmp_path):
    """The chaos tests' write delay (`faults.slow_write_registry`, public orbax seams only, passed in as the
    checkpointer's handler registry): while it lasts the step is an unfinished tmp directory; afterwards it is
    complete and restores as usual."""
    import time

    from ssft_jax import faults
    c = ckpt.Checkpointer(tmp_path / "ckpt", async_save=True,
                          handler_registry=faults.slow_write_registry(0.5, ckpt.ITEMS[1:]))
    try:
        t0 = time.perf_counter()
        c.save(1, {"x": jnp.ones(3)}, data_state={"i": 1}, config={"lr": 0.1})
        assert [p.name for p in (tmp_path / "ckpt").iterdir() if ".orbax-checkpoint-tmp" in p.name], \
            "no write in flight right after an async save"
        assert not (tmp_path / "ckpt" / "1").exists()
        c.wait()
        assert time.perf_counter() - t0 >= 0.5
        assert c.all_steps() == [1]
        _, state, data, config = c.restore(
            1, {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, require=("state", "data")
        )[:4]
        assert data == {"i": 1} and config == {"lr": 0.1}
        np.testing.assert_array_equal(state["x"], np.ones(3))
    finally:
        c.close()
    plain = ckpt.Checkpointer(tmp_path / "ckpt")  # a step written slowly reads back without the hook
    try:
        assert plain.restore(1, {"x": jax.ShapeDtypeStruct((3,), jnp.float32)})[3] == {"lr": 0.1}
    finally:
        plain.close()
