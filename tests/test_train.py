"""The SSFT trainer end to end on the tiny demo config: methods, diagnostics, sharding, compile-once, resume."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from ssft_jax import assembly, config as config_lib, data as data_lib, losses, mesh as mesh_lib, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def demo_config(arg="tiny"):
    c = config_lib.load_config("demo", arg)
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    return c


@pytest.mark.parametrize("method", ["ssft", "random", "sft_mixed", "fixed"])
def test_each_method_runs_compiles_once_and_exports(method, tmp_path):
    c = demo_config()
    c.ssft.method = method
    c.num_steps = 4
    s = train.run(c, tmp_path, progress=False)
    assert s["compiles"] == 1
    assert sorted(s["losses"]) == [1, 2, 3, 4] and all(np.isfinite(list(s["losses"].values())))
    counts = np.asarray(s["tag_counts"])
    assert counts.sum() == 4 * c.batch_size * c.ssft.max_traces  # every trace got a tag every step
    if method == "sft_mixed":
        assert counts[0] == counts.sum()
    if method == "fixed":
        assert (counts[: c.ssft.max_traces] == counts.sum() // c.ssft.max_traces).all()
    if method in ("ssft", "random"):  # one-to-one: no pattern repeats a tag
        assert all(len(set(p.split())) == len(p.split()) for p, _ in s["assignment_patterns"])
    assert (pathlib.Path(s["export_dir"]) / "config.json").exists()
    logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    if method == "ssft":
        # >= 0 up to float32 rounding: the best and the second-best totals each sum M costs of ~4 nats, and at
        # initialisation the costs nearly tie (a minimum of -1.9e-6 measured at step 1 under the suite's XLA flags)
        assert all(r["solver_not_certified"] == 0 and r["second_best_gap_min"] >= -1e-5 for r in logged)


def test_overfits_a_few_questions(tmp_path):
    c = demo_config()
    c.data.num_questions = 4
    c.batch_size = 4
    c.num_steps = 60
    c.optim.update(learning_rate=1e-2, warmup_frac=0.0, weight_decay=0.0)
    c.checkpoint.every_steps = 1000
    c.log_every = 10
    s = train.run(c, tmp_path, progress=False)
    first, last = s["losses"][1], s["losses"][60]
    assert last < 0.35 * first, (first, last)


def _pieces(c, mesh, tmp_path):
    x = assembly.build_inputs(c, mesh)
    batch = next(data_lib.make_iterator(x.questions, x.layout, x.tag_table, x.tag_lengths, seed=0))
    return x.model_config, x.params, batch, x.tag_table, x.tag_lengths


def test_ssft_assignment_equals_scipy_on_the_step_costs(tmp_path):
    c = demo_config()
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg, params, batch, table, lengths = _pieces(c, mesh, tmp_path)
    N, M = c.ssft.num_tags, c.ssft.max_traces
    cost = jax.jit(lambda p, v: losses.cost_matrix(cfg, p, v, N, M))(params, batch["cost"])
    tags, ok, _ = losses.assign("ssft", cost, jnp.asarray(batch["cost"]["tag_valid"]),
                                jnp.asarray(batch["train"]["trace_valid"]), jax.random.key(0))
    cost = np.asarray(cost)
    for b in range(cost.shape[0]):
        valid = np.asarray(batch["train"]["trace_valid"][b])
        rows, cols = linear_sum_assignment(cost[b][:, valid])
        np.testing.assert_allclose(cost[b][np.asarray(tags[b])[valid], np.arange(valid.sum())].sum(),
                                   cost[b][rows, cols].sum(), rtol=1e-6)


@pytest.mark.parametrize("method", ["fixed", "ssft"])
def test_one_device_and_eight_device_steps_agree(method, tmp_path):
    results = {}
    for name, mesh_cfg in {"1": dict(data=1, fsdp=1, tensor=1, num_devices=1),
                           "8": dict(data=2, fsdp=2, tensor=2, num_devices=8)}.items():
        c = demo_config()
        c.ssft.method = method
        c.mesh.update(**mesh_cfg)
        c.num_steps = 3
        c.export_hf = False
        results[name] = train.run(c, tmp_path / name, progress=False)
    one, eight = results["1"], results["8"]
    assert len(eight["state"]["params"]["layers"]["q_proj"].sharding.device_set) == 8
    np.testing.assert_allclose(one["losses"][1], eight["losses"][1], rtol=1e-5)
    if method == "fixed":
        # Same maths, different reduction order: agreement to float rounding, step after step.
        for step in (2, 3):
            np.testing.assert_allclose(one["losses"][step], eight["losses"][step], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5),
                     one["state"]["params"], eight["state"]["params"])
    # With ssft, later steps are not compared: at initialisation the special-token tags share one embedding, so
    # their costs tie up to rounding and reduction order may legitimately pick a different optimal assignment.


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    c = demo_config()
    c.num_steps = 6
    c.checkpoint.every_steps = 2
    full = train.run(c, tmp_path / "full", progress=False)
    part = train.run(c, tmp_path / "resumed", progress=False, stop_after=3)
    assert part["final_step"] == 3 and part["stopped_early"]
    rest = train.run(c, tmp_path / "resumed", progress=False)
    assert rest["start_step"] == 3 and rest["final_step"] == 6
    for step in (4, 5, 6):
        assert rest["losses"][step] == full["losses"][step]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 rest["state"]["params"], full["state"]["params"])


@pytest.mark.parametrize("field,value,message", [
    ("ssft.max_traces", 8, "max_traces .M=8. > ssft.num_tags .N=6."),
    ("ssft.cost_prefix_len", 500, "cost_prefix_len .L=500. is longer than the trace budget"),
    ("ssft.method", "greedy", "ssft.method='greedy'"),
    ("ssft.cost_layout", "dense", "ssft.cost_layout='dense'"),
    ("micro_batches", 3, "batch_size=4 is not divisible by micro_batches=3"),
    ("mesh.data", 3, "does not match the 1 devices"),
])
def test_impossible_configs_are_refused_before_compute(field, value, message, tmp_path):
    c = demo_config()
    section, _, key = field.rpartition(".")
    (c[section] if section else c)[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        train.run(c, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    c = demo_config()
    c.mesh.update(data=8, fsdp=1, tensor=1, num_devices=8)
    with pytest.raises(config_lib.ConfigError, match="not divisible by the data-parallel size 8"):
        train.run(c, tmp_path, progress=False)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    results = {}
    for k in (1, 2, 4):
        c = demo_config()
        c.ssft.method = "fixed"  # deterministic assignment: the only difference is how the batch is split
        c.micro_batches = k
        c.num_steps = 2
        c.export_hf = False
        results[k] = train.run(c, tmp_path / str(k), progress=False)
    for k in (2, 4):
        for step in (1, 2):
            np.testing.assert_allclose(results[k]["losses"][step], results[1]["losses"][step], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                     results[k]["state"]["params"], results[1]["state"]["params"])


def test_resume_onto_a_different_mesh(tmp_path):
    c = demo_config()
    c.ssft.method = "fixed"
    c.num_steps = 4
    c.export_hf = False
    full = train.run(c, tmp_path / "full", progress=False)
    train.run(c, tmp_path / "moved", progress=False, stop_after=2)
    c.mesh.update(data=2, fsdp=2, tensor=2, num_devices=8)
    rest = train.run(c, tmp_path / "moved", progress=False)
    assert rest["start_step"] == 2
    assert len(rest["state"]["params"]["layers"]["q_proj"].sharding.device_set) == 8
    for step in (3, 4):
        np.testing.assert_allclose(rest["losses"][step], full["losses"][step], rtol=1e-5)


def test_prefix_cache_cost_layout_trains_like_packed(tmp_path):
    """The two cost layouts give the same C (tests/test_data.py), so the same matched costs and losses. At
    initialisation the special-token tags share the mean embedding and the costs tie across tags; which optimal
    assignment breaks the tie may differ by float rounding, so later steps are compared loosely."""
    runs = {}
    for layout in ("packed", "prefix_cache"):
        c = demo_config()
        c.ssft.cost_layout = layout
        c.num_steps, c.export_hf = 3, False
        runs[layout] = train.run(c, tmp_path / layout, progress=False)
        assert runs[layout]["compiles"] == 1
    logs = {k: [json.loads(l) for l in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in runs}
    for a, b in zip(logs["packed"], logs["prefix_cache"]):
        rtol = 1e-5 if a["step"] <= 2 else 1e-3  # steps 1-2: identical weights and tied tags; then tie-breaks differ
        for key in ("matched_nll", "unmatched_nll", "loss"):
            np.testing.assert_allclose(b[key], a[key], rtol=rtol, err_msg=f"step {a['step']} {key}")
