"""`ssft.cost_layout="auto"` (the default): the layout with the fewest step FLOPs whose planned memory fits the
device, decided from the counts `flops` and `memory_plan` use; explicit layouts win; the trainer, its throughput
figures and the planner all follow the decision."""
import logging

import pytest

from ssft_jax import assembly, config as config_lib, cost_layouts, flops, memory_plan


def tiny(layout="auto"):
    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.ssft.cost_layout = layout
    return c


def test_auto_is_the_default_and_explicit_layouts_win():
    assert config_lib.base_config().ssft.cost_layout == "auto"
    config_lib.validate(tiny(), 1)
    with pytest.raises(config_lib.ConfigError, match="ssft.cost_layout"):
        config_lib.validate(tiny("nope"), 1)
    for name in cost_layouts.names():
        assert memory_plan.resolve_cost_layout(tiny(name), 1) == name
        assert (
            memory_plan.with_resolved_cost_layout(tiny(name), assembly.build_layout(tiny(), 1)).ssft.cost_layout == name
        )
    assert memory_plan.resolve_cost_layout(tiny(), 1) == "prefix_cache"
    # the step itself never guesses: an undecided "auto" is refused with what to call
    with pytest.raises(config_lib.ConfigError, match="with_resolved_cost_layout"):
        assembly.make_step(tiny(), None, None, None, None, None, None)


def test_auto_picks_the_fewest_flops_among_the_layouts_that_fit(monkeypatch):
    c = tiny()
    choice = memory_plan.choose_cost_layout(c, num_devices=1)
    # the figures are the counts flops.step_flops and make_plan give for each explicit layout
    for name in cost_layouts.names():
        plan = memory_plan.make_plan(tiny(name), num_devices=1)
        lay = assembly.build_layout(tiny(name), plan.dims["Lt"], num_processes=1)
        f = flops.step_flops(plan.cfg, lay, c.batch_size, needs_costs=True, cost_layout=name).model
        sft = flops.step_flops(plan.cfg, lay, c.batch_size, needs_costs=False).model
        assert choice.flops_ratio[name] == pytest.approx(f / sft) and choice.bytes_per_device[name] == plan.total
    assert choice.layout == min(choice.flops_ratio, key=choice.flops_ratio.get) == "prefix_cache"
    # the planner plans what auto chooses
    assert memory_plan.make_plan(c, num_devices=1).dims["cost_layout"] == "prefix_cache"

    # a device on which only the packed row fits: packed, although it costs more FLOPs
    real = memory_plan.make_plan

    def heavier_cache(config, **kw):
        plan = real(config, **kw)
        if config.ssft.cost_layout == "prefix_cache":
            plan.rows.append(("stand-in", 1 << 30, "makes the cache layout heavier"))
        return plan

    monkeypatch.setattr(memory_plan, "make_plan", heavier_cache)
    limit = choice.bytes_per_device["packed"] + (1 << 29)
    tight = memory_plan.choose_cost_layout(c, num_devices=1, limit_bytes=limit)
    assert tight.layout == "packed" and tight.fits == {"packed": True, "prefix_cache": False}
    assert "prefix_cache: " in tight.describe() and "(does not fit)" in tight.describe()
    # none fits: the smaller one
    assert memory_plan.choose_cost_layout(c, num_devices=1, limit_bytes=1).layout == "packed"


def test_the_trainer_logs_and_runs_the_auto_choice(tmp_path, caplog):
    from ssft_jax import train
    c = tiny()
    c.num_steps, c.export_hf = 2, False
    with caplog.at_level(logging.INFO):
        s = train.run(c, tmp_path, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cost_layout auto ->")]
    assert len(lines) == 1 and lines[0].startswith("cost_layout auto -> prefix_cache (packed: ")
    assert s["final_step"] == 2 and "SFT FLOPs" in lines[0]
