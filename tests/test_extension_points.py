"""A new method, matcher, cost layout and GFPO estimator are one function and one registration line each:
registered here (in fixtures, removed afterwards), they run through config validation, the trainer (or the GFPO
stage), evaluation, the FLOP count and the memory plan with no other file touched."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import (
    assembly,
    config as config_lib,
    cost_layouts,
    datasets,
    evaluate,
    flops,
    gfpo,
    gfpo_estimators,
    losses,
    matching,
    memory_plan,
    metrics_log,
    train,
)


def tiny_config(**ssft):
    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.num_steps = 2
    c.export_hf = False
    c.ssft.update(**ssft)
    return c


@pytest.fixture
def reversed_method():
    """Trace j always gets tag M-1-j (a fixed permutation other than the built-in `fixed`)."""
    def reversed_tags(cost, tag_valid, trace_valid, rng):
        M = trace_valid.shape[1]
        return jnp.broadcast_to(jnp.arange(M - 1, -1, -1, dtype=jnp.int32), trace_valid.shape)

    losses.register_method("reversed", losses.Method(losses.cost_blind(reversed_tags), needs_costs=False))
    yield "reversed"
    del losses.METHODS["reversed"]


@pytest.fixture
def greedy_matcher():
    """Each trace in turn takes its cheapest free tag: valid and injective, not always optimal, so `match` must
    certify it (status OPTIMAL only when its LP gap says so)."""
    def greedy(prep, opt):
        cp = prep.cp  # [B, N, M], forbidden cells already priced out
        B, N, M = cp.shape

        def body(j, carry):
            tags, used = carry
            col = jnp.where(used, jnp.inf, cp[:, :, j])
            t = jnp.argmin(col, axis=1).astype(jnp.int32)
            return tags.at[:, j].set(t), used | (jnp.arange(N)[None, :] == t[:, None])

        tags, _ = jax.lax.fori_loop(0, M, body, (jnp.zeros((B, M), jnp.int32), jnp.zeros((B, N), bool)))
        # Prices 0: the certificate is then the plain lower bound sum_j min_i C_ij.
        return matching.Solved(tags, jnp.zeros((B, N)), jnp.zeros((B,), jnp.int32))

    matching.register_solver("greedy", greedy)
    yield "greedy"
    matching.unregister_solver("greedy")


def test_unknown_method_and_matcher_are_config_errors():
    with pytest.raises(config_lib.ConfigError, match="ssft.method='nope'"):
        config_lib.validate(tiny_config(method="nope"))
    with pytest.raises(config_lib.ConfigError, match="ssft.matcher='nope'"):
        config_lib.validate(tiny_config(matcher="nope"))


def test_registered_matcher_is_certified_against_the_exact_solver(greedy_matcher):
    rng = np.random.default_rng(0)
    cost = jnp.asarray(rng.uniform(size=(64, 6, 4)), jnp.float32)
    got = matching.match(cost, method=greedy_matcher)
    exact = matching.match(cost, method="bruteforce")
    assert (got.status != matching.STATUS_INVALID).all()
    for b in range(64):  # injective on every question
        assert len(set(np.asarray(got.tag_of_trace[b]).tolist())) == 4
    optimal = np.isclose(np.asarray(got.total_cost), np.asarray(exact.total_cost), atol=1e-5)
    certified = np.asarray(got.status) == matching.STATUS_OPTIMAL
    assert not (certified & ~optimal).any()  # never certifies a suboptimal answer
    assert (~optimal).any()  # greedy is suboptimal somewhere, so the test can tell a solver from a stub
    assert (np.asarray(got.gap)[~optimal] > 0).all()


def test_registered_method_and_matcher_train_and_evaluate(reversed_method, greedy_matcher, tmp_path):
    c = tiny_config(method=reversed_method)
    config_lib.validate(c, 1)
    run = train.run(c, tmp_path / "reversed", progress=False)
    M = c.ssft.max_traces
    counts = np.asarray(run["tag_counts"])
    # Every trace j went to tag M-1-j: tags 0..M-1 used equally often (questions have M traces here), none beyond.
    assert counts[M:].sum() == 0 and counts.sum() > 0
    # Patterns are "tag of trace 1 ... tag of trace M" (-1 for a missing trace): always M-1, M-2, ..., 0.
    for pattern, _ in run["assignment_patterns"]:
        tags = [int(t) for t in pattern.split()]
        assert all(t == M - 1 - j for j, t in enumerate(tags) if t >= 0), pattern

    c = tiny_config(method="ssft", matcher=greedy_matcher)
    run = train.run(c, tmp_path / "greedy", progress=False)
    assert run["final_step"] == 2 and np.isfinite(list(run["losses"].values())).all()
    _, heldout = datasets.build_records(c)
    res = evaluate.evaluate_model(run["model_config"], run["state"]["params"], run["tokenizer"], run["tags"],
                                  heldout[:2], "synthetic", temperature=0.0, max_new_tokens=8)
    assert len(res.generations) == 2 * c.ssft.num_tags


@pytest.fixture
def halves_layout():
    """The packed cost pass run on each half of the batch in turn: the same C, another graph. Its FLOPs and memory
    are the packed pass's (the registration line says so)."""
    def halves_token_nll(cfg, params, cv, **kw):
        h = cv["tokens"].shape[0] // 2
        return jnp.concatenate([cost_layouts.packed_token_nll(cfg, params, {k: v[s] for k, v in cv.items()}, **kw)
                                for s in (slice(0, h), slice(h, None))])

    cost_layouts.register("halves", cost_layouts.CostLayout(halves_token_nll, cost_layouts.PACKED.flops,
                                                            cost_layouts.PACKED.memory))
    yield "halves"
    cost_layouts.unregister("halves")


@pytest.fixture
def rloo_estimator():
    """Leave-one-out advantages (RLOO): A_r = r - the mean of the group's other rewards, weight 1/G."""
    def rloo_advantages(rewards, row_tags, logp_old, valid, *, samples_per_tag, eps, normalize_std):
        G = rewards.shape[-1]
        adv = rewards - (rewards.sum(-1, keepdims=True) - rewards) / (G - 1)
        return adv, jnp.full(rewards.shape, 1.0 / G, jnp.float32)

    gfpo_estimators.register("rloo", gfpo_estimators.Estimator(rloo_advantages, min_group_size=2))
    yield "rloo"
    gfpo_estimators.unregister("rloo")


def test_a_registered_cost_layout_runs_a_step_and_is_counted_and_planned(halves_layout, tmp_path):
    c = tiny_config(method="ssft", cost_layout=halves_layout)
    config_lib.validate(c, 1)
    ref = train.run(tiny_config(method="ssft", cost_layout="packed"), tmp_path / "packed", progress=False)
    run = train.run(c, tmp_path / "halves", progress=False)
    assert run["final_step"] == 2
    np.testing.assert_allclose(list(run["losses"].values()), list(ref["losses"].values()), rtol=1e-5)
    assert run["tag_counts"] == ref["tag_counts"]  # the same C: the same matches
    # the FLOP count and the memory plan read the registry: this layout is counted as its rules say
    plan = memory_plan.make_plan(c, num_devices=1)
    packed_plan = memory_plan.make_plan(tiny_config(cost_layout="packed"), num_devices=1)
    assert plan.dims["cost_layout"] == "halves" and plan.cost_pass == packed_plan.cost_pass
    lay = assembly.build_layout(c, plan.dims["Lt"], num_processes=1)
    got = flops.step_flops(plan.cfg, lay, c.batch_size, needs_costs=True, cost_layout=halves_layout)
    assert got == flops.step_flops(plan.cfg, lay, c.batch_size, needs_costs=True, cost_layout="packed")
    with pytest.raises(config_lib.ConfigError, match="ssft.cost_layout"):
        config_lib.validate(tiny_config(cost_layout="quarters"), 1)


def test_a_registered_gfpo_estimator_runs_the_stage(rloo_estimator, tiny_ssft_run, tmp_path):
    rewards = jnp.asarray([[1.0, 0.0, 0.0]])
    adv, w = gfpo.advantages_and_weights(rloo_estimator, rewards, None, None, None, samples_per_tag=1, eps=0.0,
                                         normalize_std=False)
    np.testing.assert_allclose(np.asarray(adv), [[1.0, -0.5, -0.5]])
    np.testing.assert_allclose(np.asarray(w), 1 / 3, rtol=1e-6)
    c = config_lib.load_config("gfpo_demo", "tiny")
    c.mesh.update(num_devices=1, data=1)
    c.export_hf = False
    c.gfpo.update(init_from=str(tiny_ssft_run[0]), estimator=rloo_estimator, num_steps=2)
    small = c.copy_and_resolve_references()
    small.gfpo.group_size = 1
    with pytest.raises(config_lib.ConfigError, match="group_size=1"):  # its own minimum, from the registration
        gfpo.run(small, tmp_path / "small", progress=False)
    s = gfpo.run(c, tmp_path / "rloo", progress=False,
                 reward_fn=lambda record, text, result: float(len(text) % 2 == 0))
    assert s["final_step"] == 2 and s["estimator"] == "rloo"
    G, Q = c.gfpo.group_size, c.gfpo.questions_per_step
    recs = metrics_log.read_metrics(tmp_path / "rloo")
    assert [sum(r["rollout_tag_counts"]) for r in recs] == [G * Q] * 2  # G draws from pi per question
