"""Reliability under faults, one test per fault (the guarantees are listed in README.md, "Reliability"):

  * kill -9 of a training process at random moments (during start-up, between and inside steps, in the middle of an
    async checkpoint write), repeated: each restart resumes from the last complete checkpoint, and the metrics log
    of the interrupted run equals the uninterrupted run's record for record, as do the final weights;
  * a corrupted or truncated checkpoint: a CheckpointError naming the step, or a fall-back to the previous step
    (`checkpoint.on_corrupt`); no single damaged file ever gives a silent partial restore;
  * disk full or an unwritable workdir, at start and during a save (sync and async);
  * NaN/inf injected into the cost matrix, the loss and the gradients; a run that keeps producing them stops;
  * hundreds of malformed records of every kind the validator knows, mixed into good ones;
  * configs that cannot work, refused before any step.
SIGTERM is tested in tests/test_cli_and_configs.py::test_sigterm_checkpoints_and_the_run_resumes.

SSFT_CHAOS_TRIALS sets the number of kill -9 trials (default 4: what CI runs), SSFT_CHAOS_SEED their seed.
"""
import collections
import errno
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import (
    assembly,
    checkpoint as ckpt_lib,
    config as config_lib,
    data as data_lib,
    faults,
    mesh as mesh_lib,
    metrics_log,
    tokenization as tk,
    train,
    train_state,
)

# A failed orbax restore leaves coroutines behind that are reported when garbage-collected: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("SSFT_CHAOS_TRIALS", "4"))
SEED = int(os.environ.get("SSFT_CHAOS_SEED", "0"))


def _numbers(workdir) -> list[dict]:
    """The run's logged records without the wall-clock figures (step time, throughput): everything else must be
    reproduced exactly by a resumed run."""
    return metrics_log.without_wall_clock(metrics_log.read_metrics(workdir))


# What differs between one uninterrupted process and a run resumed any number of times: everything else in
# summary.json (per-step losses, tag counts, assignment patterns, skipped steps, ...) must be equal.
PER_PROCESS_SUMMARY_KEYS = ("start_step", "seconds", "compiles")


def _summary(workdir) -> dict:
    s = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in PER_PROCESS_SUMMARY_KEYS}


def demo_config(arg="tiny"):
    c = config_lib.load_config("demo", arg)
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    return c


def _cfg():
    """6 steps, a checkpoint every 2 (steps 2, 4, 6 are kept), every step logged."""
    c = demo_config()
    c.num_steps = 6
    c.checkpoint.update(every_steps=2, max_to_keep=3)
    c.log_every = 1
    c.export_hf = False
    return c


def _steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _tmp_steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    tag = ".orbax-checkpoint-tmp"
    return sorted(int(p.name.split(tag)[0]) for p in d.iterdir() if tag in p.name) if d.exists() else []


def _fingerprint(workdir, step):
    """The per-array fingerprints saved with a checkpoint: equal dicts = bit-identical train states."""
    return json.loads((pathlib.Path(workdir) / "checkpoints" / str(step) / "integrity" / "metadata").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted in-process run every in-process fault test is compared against."""
    wd = tmp_path_factory.mktemp("reference")
    train.run(_cfg(), wd, progress=False)
    assert _steps(wd) == [2, 4, 6]
    return {"workdir": wd, "records": _numbers(wd), "fingerprint": _fingerprint(wd, 6), "summary": _summary(wd)}


# ---------------------------------------------------------------------------------------------------------------
# kill -9 at random moments
# ---------------------------------------------------------------------------------------------------------------

CHAOS_STEPS = 20
CHAOS_FLAGS = (f"--config.num_steps={CHAOS_STEPS}", "--config.checkpoint.every_steps=2", "--config.log_every=1",
               "--config.export_hf=False")
WRITE_DELAY_S = 0.25  # test hook: each async checkpoint write takes at least this long, so kills can land mid-write


def _launch(workdir, log_path):
    # the trainer's CLI with the slow-write hook passed to its checkpointer (tests/slow_writes.py)
    cmd = [sys.executable, str(ROOT / "tests" / "slow_writes.py"), str(WRITE_DELAY_S),
           f"--config={ROOT / 'configs' / 'demo.py'}:tiny", f"--workdir={workdir}", "--config.mesh.num_devices=1",
           "--config.mesh.data=1", *CHAOS_FLAGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log:  # a file, not a pipe: nobody reads while it runs, a full pipe would block it
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _resumed_from(log_path):
    found = re.findall(r"resumed from step (\d+)", pathlib.Path(log_path).read_text())
    return int(found[-1]) if found else None


def _wait_for(cond, p, timeout=240.0):
    """True once cond() holds while p runs; False if p exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if p.poll() is not None:
            return False
        time.sleep(0.02)
    p.kill()
    raise AssertionError("chaos trial timed out")


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(tmp_path):
    rng = random.Random(SEED)
    ref = tmp_path / "reference"
    p = _launch(ref, tmp_path / "reference.log")
    assert p.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    want = _numbers(ref)
    assert [r["step"] for r in want] == list(range(1, CHAOS_STEPS + 1))

    wd = tmp_path / "chaos"
    kinds = ("mid_write", "after_step", "startup")
    trials = []
    for t in range(TRIALS):
        complete = _steps(wd)
        resume = complete[-1] if complete else None
        # Records past `resume` are stale (the killed process logged them, the next one drops and re-logs them):
        # conditions below only look past them, so they can only be met by the new process.
        floor = max([resume or 0] + [r["step"] for r in metrics_log.read_metrics(wd)])
        kind = kinds[t % len(kinds)]
        if kind == "after_step" and floor + 1 > CHAOS_STEPS - 1:
            kind = "startup"
        log = tmp_path / f"trial{t}.log"
        p = _launch(wd, log)
        if kind == "startup":
            time.sleep(rng.uniform(0.3, 2.5))
            alive = p.poll() is None
        elif kind == "after_step":
            target = rng.randint(floor + 1, CHAOS_STEPS - 1)
            alive = _wait_for(lambda: any(r["step"] >= target for r in metrics_log.read_metrics(wd)), p)
            time.sleep(rng.uniform(0.0, 0.3))
        else:  # the async write of a step the new process reached is in flight
            alive = _wait_for(lambda: any(s > floor for s in _tmp_steps(wd)), p)
            time.sleep(rng.uniform(0.0, 0.05))
        writing = [s for s in _tmp_steps(wd) if s > floor]
        p.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=60)
        killed = rc == -signal.SIGKILL
        assert killed or rc == 0, log.read_text()[-3000:]
        mid_write = killed and alive and bool(writing) and bool(set(writing) & set(_tmp_steps(wd)))
        # The process restored the last complete checkpoint there was when it started (or none): never a tmp step.
        got = _resumed_from(log)
        if got is not None or resume is None:
            assert got == resume, (t, kind, got, resume)
        trials.append(dict(kind=kind, killed=killed, resumed_from=got, complete_after=_steps(wd),
                           half_written_after=_tmp_steps(wd), mid_write=mid_write))

    complete = _steps(wd)
    log = tmp_path / "final.log"
    p = _launch(wd, log)
    assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert _resumed_from(log) == (complete[-1] if complete else None)
    got = _numbers(wd)
    assert [r["step"] for r in got] == list(range(1, CHAOS_STEPS + 1))  # one record per step, none lost or doubled
    assert got == want  # the loss curve (and every other logged number) equals the uninterrupted run's exactly
    assert _fingerprint(wd, CHAOS_STEPS) == _fingerprint(ref, CHAOS_STEPS)  # so do the final weights and moments
    assert not _tmp_steps(wd)
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["final_step"] == CHAOS_STEPS
    # The whole run's statistics, not the last process's share: what evaluation's coverage tag and GFPO's used
    # tags read. The uninterrupted run's are the reference.
    assert _summary(wd) == _summary(ref)
    assert sum(summary["tag_counts"]) == sum(_summary(ref)["tag_counts"]) > 0
    print("\nkill -9 trials:", json.dumps(trials))
    assert sum(t["killed"] for t in trials) >= TRIALS - 1
    if TRIALS >= 1:
        assert any(t["mid_write"] for t in trials), trials  # at least one kill landed inside a checkpoint write


def test_a_finished_run_can_be_started_again(reference, tmp_path):
    """E.g. killed after its last checkpoint, before the export: the same command just finishes."""
    wd = tmp_path / "wd"
    shutil.copytree(reference["workdir"], wd)
    (wd / "summary.json").unlink()
    s = train.run(_cfg(), wd, progress=False)
    assert s["start_step"] == s["final_step"] == 6 and s["compiles"] == 0
    assert _numbers(wd) == reference["records"] and _steps(wd) == [2, 4, 6]
    # The re-run trained nothing, yet reports the whole run (it used to report zero tag counts and no losses).
    assert _summary(wd) == reference["summary"] and sum(s["tag_counts"]) > 0 and len(s["losses"]) == 6


# ---------------------------------------------------------------------------------------------------------------
# The metrics log after a crash
# ---------------------------------------------------------------------------------------------------------------

def test_metrics_log_drops_records_past_the_restored_step_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in metrics_log.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]  # the torn last line is left out
    logger = metrics_log.MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    logger.write(4, {"loss": 40.0})
    logger.close()
    assert metrics_log.read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                                  {"step": 3, "loss": 3.0}, {"step": 4, "loss": 40.0}]
    metrics_log.MetricsLogger(tmp_path, tensorboard=False, resume_step=0).close()  # a fresh start: nothing is kept
    assert metrics_log.read_metrics(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Corrupted or truncated checkpoints
# ---------------------------------------------------------------------------------------------------------------

def _largest_file(d):
    return max((p for p in pathlib.Path(d).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _edit_fingerprint(step_dir):
    path = step_dir / "integrity" / "metadata"
    saved = json.loads(path.read_text())
    key = next(k for k in saved if "embed" in k)
    saved[key] = (saved[key] + 1) % 2**32  # what a bit flip in the data would look like to the restore
    path.write_text(json.dumps(saved))


def _json_item(step_dir, item, value):
    (step_dir / item / "metadata").write_text(json.dumps(value))


CORRUPTIONS = {
    "zero_length_array_file": lambda d: _largest_file(d / "state").write_bytes(b""),
    # Damage that is still valid JSON: each item's content is validated, never a KeyError later.
    "data_iterator_state_of_another_shape": lambda d: _json_item(d, "data", {}),
    "run_stats_of_another_shape": lambda d: _json_item(d, "stats", {"losses": {}}),
    "run_stats_missing_steps": lambda d: _json_item(
        d, "stats", {**json.loads((d / "stats" / "metadata").read_text()), "losses": {"1": 0.5}}),
    "config_item_of_another_shape": lambda d: _json_item(d, "config", {}),
    # The step's metadata lists these items: gone means damaged (verification is never switched off silently).
    "missing_integrity_item": lambda d: shutil.rmtree(d / "integrity"),
    "missing_run_stats_item": lambda d: shutil.rmtree(d / "stats"),
    "missing_array_file": lambda d: _largest_file(d / "state").unlink(),
    "missing_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "missing_data_iterator_state": lambda d: shutil.rmtree(d / "data"),
    "truncated_data_iterator_state": lambda d: (d / "data" / "metadata").write_text(
        (d / "data" / "metadata").read_text()[:7]),
    "fingerprint_mismatch": _edit_fingerprint,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_an_error_naming_the_step(reference, tmp_path, kind):
    wd = tmp_path / "wd"
    shutil.copytree(reference["workdir"], wd)
    CORRUPTIONS[kind](wd / "checkpoints" / "6")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"(?s)checkpoint step 6 .*on_corrupt=fallback"):
        train.run(_cfg(), wd, progress=False)
    assert _steps(wd) == [2, 4, 6]  # nothing moved, deleted or written
    assert _numbers(wd) == reference["records"]


@pytest.mark.parametrize("kind", ["zero_length_array_file", "data_iterator_state_of_another_shape",
                                  "missing_integrity_item"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_step(reference, tmp_path, kind):
    wd = tmp_path / "wd"
    shutil.copytree(reference["workdir"], wd)
    CORRUPTIONS[kind](wd / "checkpoints" / "6")
    c = _cfg()
    c.checkpoint.on_corrupt = "fallback"
    s = train.run(c, wd, progress=False)
    assert s["start_step"] == 4 and s["final_step"] == 6
    assert (wd / "checkpoints" / "6.corrupt").is_dir()  # kept for inspection, never listed as a step again
    assert _numbers(wd) == reference["records"]
    assert _fingerprint(wd, 6) == reference["fingerprint"]
    assert _summary(wd) == reference["summary"]
    if kind != "zero_length_array_file":
        return
    # Every step damaged: an error, never a silent restart from scratch.
    for step in _steps(wd):
        CORRUPTIONS["zero_length_array_file"](wd / "checkpoints" / str(step))
    with pytest.raises(ckpt_lib.CheckpointError, match="no usable checkpoint"):
        train.run(c, wd, progress=False)


def _strip_item_from_metadata(step_dir, item):
    """What a step written before `item` existed looks like: not in the metadata's item handlers, no folder."""
    meta_path = step_dir / ckpt_lib.STEP_METADATA
    meta = json.loads(meta_path.read_text())
    del meta["item_handlers"][item]
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(step_dir / item)


def test_a_checkpoint_that_predates_an_item_resumes_and_says_so(reference, tmp_path, caplog):
    """Told apart from damage by the step's own metadata: an item it was never saved with is not missing."""
    wd = tmp_path / "wd"
    shutil.copytree(reference["workdir"], wd)
    for item in ("integrity", "stats"):
        _strip_item_from_metadata(wd / "checkpoints" / "4", item)
    shutil.rmtree(wd / "checkpoints" / "6")
    with caplog.at_level("WARNING"):
        s = train.run(_cfg(), wd, progress=False)
    assert s["start_step"] == 4 and s["final_step"] == 6
    assert "predates the integrity fingerprints" in caplog.text and "predates the run-statistics item" in caplog.text
    assert _fingerprint(wd, 6) == reference["fingerprint"]
    # The steps before it are unknown: the summary says which steps it covers instead of pretending.
    assert s["stats_cover_steps_from"] == 5 and sorted(s["losses"]) == [5, 6]
    assert {str(k): v for k, v in s["losses"].items()} == {k: v for k, v in reference["summary"]["losses"].items()
                                                          if int(k) > 4}
    # ...and the next checkpoint keeps saying so: a later resume reads it back without complaint.
    assert train.run(_cfg(), wd, progress=False)["stats_cover_steps_from"] == 5


def test_a_long_library_error_is_cut_to_its_first_line(reference, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(reference["workdir"], wd)
    CORRUPTIONS["missing_array_file"](wd / "checkpoints" / "6")
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        train.run(_cfg(), wd, progress=False)
    message = str(e.value)
    # TensorStore's own line (which array, what is wrong with it), not ~60 lines of spec after it
    assert "cannot be read" in message and "Error reading" in message and "--debug shows the whole error" in message
    assert len(message.splitlines()) <= 2 and len(message) < 800 and "TensorStore({" not in message, message
    chain, cause = [], e.value.__cause__
    while cause is not None:
        chain.append(len(str(cause)))
        cause = cause.__cause__
    assert max(chain) > 1000  # the whole error is kept in the chain, for --debug's traceback


def test_no_single_damaged_file_gives_a_silent_partial_restore(tmp_path):
    """Each file of a saved step, zero-length or deleted in turn: the restore raises, or returns exactly what was
    saved (files orbax no longer needs, such as superseded b-tree nodes)."""
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) / 7, "b": jnp.ones(64, jnp.bfloat16),
             "step": jnp.int32(5), "rng": jax.random.key_data(jax.random.key(1))}
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.P()))
    pristine = tmp_path / "pristine"
    c = ckpt_lib.Checkpointer(pristine, async_save=False)
    c.save(5, state, data_state={"next": 5}, config={"lr": 1.0})
    c.close()
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file())
    outcomes = collections.Counter()
    for k, rel in enumerate(files):
        for damage in ("zero", "delete"):
            d = tmp_path / f"case{k}_{damage}"  # a new path each time: no cache can answer for a damaged file
            shutil.copytree(pristine, d)
            (d / rel).write_bytes(b"") if damage == "zero" else (d / rel).unlink()
            c = ckpt_lib.Checkpointer(d, async_save=False)
            try:
                step, got, data_state, _ = c.restore(5, ckpt_lib.abstract_like(state), require=("state", "data"))[:4]
            except ckpt_lib.CheckpointError as e:
                assert "step 5" in str(e)
                outcomes["error"] += 1
            else:
                jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, state)
                assert data_state == {"next": 5}
                outcomes["identical"] += 1
            finally:
                c.close()
    print(f"\n{len(files)} files x (zero-length, deleted): {dict(outcomes)}")
    assert outcomes["error"] >= 8, outcomes  # the array data, manifests, metadata and JSON items are all needed


# ---------------------------------------------------------------------------------------------------------------
# Disk full, unwritable workdir
# ---------------------------------------------------------------------------------------------------------------

def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")


def test_disk_full_during_an_async_write_stops_the_run_naming_the_step(reference, tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    original = jch.JsonCheckpointHandler._save_fn

    async def failing(self, x, directory):  # runs in orbax's background thread, after save() has returned
        if "4.orbax-checkpoint-tmp" in str(directory):
            raise _enospc()
        return await original(self, x, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", failing)
    wd = tmp_path / "wd"
    with pytest.raises(ckpt_lib.CheckpointError, match=r"writing checkpoint step 4 .*No space left.*NOT saved"):
        train.run(_cfg(), wd, progress=False)
    assert _steps(wd) == [2] and not (wd / "summary.json").exists()  # the run did not go on as if step 4 was saved
    monkeypatch.undo()
    s = train.run(_cfg(), wd, progress=False)  # space is back: the same command resumes from the last complete step
    assert s["start_step"] == 2
    assert _numbers(wd) == reference["records"]
    assert _fingerprint(wd, 6) == reference["fingerprint"]


def test_disk_full_when_a_save_starts_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    original = ocp.CheckpointManager.save

    def failing(self, step, *args, **kwargs):
        if step == 4:
            raise _enospc()
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing)
    with pytest.raises(ckpt_lib.CheckpointError, match="saving checkpoint step 4 .* failed: .*No space left"):
        train.run(_cfg(), tmp_path, progress=False)
    assert _steps(tmp_path) == [2] and not (tmp_path / "summary.json").exists()


def test_unwritable_workdir_is_refused_before_any_compute(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ckpt_lib.CheckpointError, match="workdir .*a_file/wd is not writable"):
        train.run(_cfg(), blocker / "wd", progress=False)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last byte (needs root and mount; skipped where the sandbox does not allow it)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_at_start_is_a_clear_error(full_disk):
    with pytest.raises(ckpt_lib.CheckpointError, match="is not writable: .*No space left on device"):
        train.run(_cfg(), full_disk / "wd", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite numbers
# ---------------------------------------------------------------------------------------------------------------

# step 1: NaN in a cost matrix (that question is dropped); 2: NaN loss; 3: NaN gradient; 4: +inf gradient; 5 clean;
# 6 onwards: +inf loss, until the run stops.
INJECT = "cost:1,loss:2,grad:3,grad:4:inf,loss:6+:inf"


def _nonfinite_cfg():
    c = _cfg()
    c.num_steps = 10
    c.checkpoint.every_steps = 3
    c.max_consecutive_skips = 3
    c.debug.inject_nonfinite = INJECT
    return c


def test_injection_adds_nothing_to_a_normal_step():
    assert faults.make_injector("") is None
    c = config_lib.load_config("demo", "tiny")
    c.debug.inject_nonfinite = "weights:1"
    with pytest.raises(config_lib.ConfigError, match="debug.inject_nonfinite"):
        config_lib.validate(c)


def test_nonfinite_cost_loss_and_gradients(tmp_path):
    c = _nonfinite_cfg()
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, cfg, params, _, layout, questions, _, table, lengths = assembly.build_inputs(c, mesh)
    iterator = data_lib.make_iterator(questions, layout, table, lengths, seed=c.seed)
    optimizer = assembly.make_optimizer(c, c.num_steps)
    state = train_state.init_state(params, optimizer, c.seed, mesh)
    c.debug.inject_nonfinite = INJECT
    batches = [mesh_lib.to_global(next(iterator), mesh) for _ in range(5)]
    step = assembly.make_step(c, cfg, layout, optimizer, state, batches[0], mesh)
    host = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731  (copies: the step donates its input)
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))  # noqa: E731
    for k, batch in enumerate(batches, start=1):
        before = host(state)
        state, m = step(state, batch, jnp.asarray(table), jnp.asarray(lengths))
        after, m = host(state), jax.device_get(m)
        assert int(after["step"]) == k
        if k in (1, 5):  # a normal update; at step 1 without the question whose costs were NaN
            assert m["step_skipped"] == 0 and np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
            assert m["questions_dropped"] == (1 if k == 1 else 0)
            kept = np.asarray(batch["train"]["trace_valid"])[1 if k == 1 else 0:]  # question 0 had the NaN
            assert m["tag_counts"].sum() == kept.sum()
            assert not same(after["opt_state"], before["opt_state"])  # (step 1 has learning rate 0: warm-up)
            assert k == 1 or not same(after["params"], before["params"])
            assert int(after["consecutive_skips"]) == 0
        else:  # skipped: weights and Adam moments (and their step count) bit-identical to before the step
            assert m["step_skipped"] == 1 and m["questions_dropped"] == 0
            assert not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))
            assert same(after["params"], before["params"]) and same(after["opt_state"], before["opt_state"])
            assert int(after["consecutive_skips"]) == int(before["consecutive_skips"]) + 1


def test_a_run_that_keeps_producing_nonfinite_steps_stops(tmp_path):
    with pytest.raises(
        train.TrainingDivergedError,
        match=r"4 consecutive steps \(steps 6\.\.9\).*max_consecutive_skips=3.*latest checkpoint is step 6",
    ):
        train.run(_nonfinite_cfg(), tmp_path, progress=False)
    records = metrics_log.read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 10))  # the steps up to the stop, each counted
    assert [r["step_skipped"] for r in records] == [0, 1, 1, 1, 0, 1, 1, 1, 1]
    assert [r["questions_dropped"] for r in records] == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert _steps(tmp_path) == [3, 6] and not (tmp_path / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad data at scale
# ---------------------------------------------------------------------------------------------------------------

def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _rec(rid, question="What is 2+3?", traces=("2+3=5",), **extra) -> dict:
    return {"id": rid, "question": question, "traces": [{"text": t} for t in traces], **extra}


# Every kind of malformed record the validator knows, as builders `id -> line bytes` (several variants each), for the
# demo tokenizer's budgets (M=4 traces, prompt <= 40 tokens, trace + end-of-turn <= 72 tokens, one per character).
BAD = {
    "broken_json": [
        lambda i: b'{"id": "%s", "question": "q", "traces": [' % i.encode(),
        lambda i: b"{'id': '%s', 'question': 'q'}" % i.encode(),
        lambda i: b'{"id": "%s", "question": "q", "traces": [],}' % i.encode(),
        lambda i: b'{"id": "%s" "question": "q"}' % i.encode(),
        lambda i: b'{"id": "%s", "question": "raw \x01 control", "traces": [{"text": "a"}]}' % i.encode(),
        lambda i: b"not json at all " + i.encode(),
        lambda i: b'{"id": "%s"}}' % i.encode(),
    ],
    "invalid_utf8": [
        lambda i: b'{"id": "%s", "question": "caf\xe9?", "traces": [{"text": "a"}]}' % i.encode(),
        lambda i: b'{"id": "%s", "question": "q", "traces": [{"text": "\xff\xfe"}]}' % i.encode(),
        lambda i: b'{"id": "%s", "question": "cut \xe2\x82", "traces": [{"text": "a"}]}' % i.encode(),
        lambda i: b'{"id": "%s", "question": "overlong \xc0\xaf", "traces": [{"text": "a"}]}' % i.encode(),
    ],
    "lone_surrogate": [
        lambda i: _j(_rec(i, question="bad \ud800 q")),
        lambda i: _j(_rec(i, traces=("ok", "bad \udfff"))),
        lambda i: _j(_rec(i, question="reversed \ude00\ud83d pair")),
        lambda i: b'{"id": "%s", "question": "raw \xed\xa0\x80 bytes", "traces": [{"text": "a"}]}' % i.encode(),
    ],
    "non_finite_number": [
        lambda i: _j(_rec(i, answer=float("nan"))),
        lambda i: _j(_rec(i, score=[1.0, float("inf")])),
        lambda i: b'{"id": "%s", "question": "q", "traces": ["a"], "answer": -Infinity}' % i.encode(),
        lambda i: b'{"id": "%s", "question": "q", "traces": ["a"], "answer": 1e999}' % i.encode(),
    ],
    "nul_byte": [
        lambda i: _j(_rec(i, question="q\u0000")),
        lambda i: _j(_rec(i, traces=("a\u0000b",))),
        lambda i: _j({"id": i, "messages": [{"role": "user", "content": "hi\u0000"}], "traces": [{"text": "a"}]}),
        lambda i: b'{"id": "%s", "question": "raw \x00 byte", "traces": [{"text": "a"}]}' % i.encode(),
    ],
    "wrong_type": [
        lambda i: _j({"id": i, "question": 5, "traces": [{"text": "a"}]}),
        lambda i: _j({"id": i, "question": "q", "traces": {"text": "a"}}),
        lambda i: _j({"id": i, "question": "q", "traces": [{"text": ["a"]}]}),
        lambda i: _j({"id": i, "question": "q", "traces": [5]}),
        lambda i: _j([i, "q", ["a"]]),
        lambda i: _j({"id": 1.5, "question": "q", "traces": [{"text": "a"}], "note": i}),
        lambda i: _j({"id": True, "question": "q", "traces": [{"text": "a"}], "note": i}),
        lambda i: _j({"id": i, "question": "q", "traces": [{"text": "a", "source": 3}]}),
        lambda i: _j(
            {"id": i, "question": "q", "messages": [{"role": "user", "content": "q"}], "traces": [{"text": "a"}]}
        ),
    ],
    "missing_field": [
        lambda i: _j({"id": i, "question": None, "traces": [{"text": "a"}]}),
        lambda i: _j({"id": i, "question": "q", "traces": [{"text": None}]}),
        lambda i: _j({"id": i, "traces": [{"text": "a"}]}),
        lambda i: _j({"id": i, "question": "q"}),
        lambda i: _j({"id": i, "question": "q", "traces": [{"source": "m1"}]}),
    ],
    "duplicate_id": [],  # built from an earlier good id, see _bad_data
    "bad_messages": [
        lambda i: _j({"id": i, "messages": [], "traces": [{"text": "a"}]}),
        lambda i: _j({"id": i, "messages": "hi", "traces": [{"text": "a"}]}),
        lambda i: _j({"id": i, "messages": [{"role": "user"}], "traces": [{"text": "a"}]}),
        lambda i: _j(
            {
                "id": i,
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "traces": [{"text": "a"}],
            }
        ),
    ],
    "empty_prompt": [
        lambda i: _j(_rec(i, question="")),
        lambda i: _j(_rec(i, question="   ")),
        lambda i: _j(_rec(i, question="\n\t ")),
    ],
    "no_traces": [lambda i: _j(_rec(i, traces=()))],
    "empty_trace": [
        lambda i: _j(_rec(i, traces=("a", ""))),
        lambda i: _j(_rec(i, traces=(" \n",))),
    ],
    "duplicate_trace": [
        lambda i: _j(_rec(i, traces=("same", "same"))),
        lambda i: _j(_rec(i, traces=("x", "y", "x"))),
    ],
    "too_many_traces": [
        lambda i: _j(_rec(i, traces=tuple("abcde"))),
        lambda i: _j(_rec(i, traces=tuple(f"t{k}" for k in range(9)))),
    ],
    "unknown_characters": [  # the character tokenizer has printable ASCII only
        lambda i: _j(_rec(i, question="caf\u00e9?")),
        lambda i: _j(_rec(i, traces=("ok", "\U0001f600"))),
        lambda i: _j({"id": i, "messages": [{"role": "user", "content": "\u00fcber"}], "traces": [{"text": "a"}]}),
    ],
    "template_error": [
        lambda i: _j(_rec(i, question="q \ue000ssft0\ue001")),
        lambda i: _j(
            {"id": i, "messages": [{"role": "user", "content": "\ue000ssft3\ue001"}], "traces": [{"text": "a"}]}
        ),
    ],
    "prompt_over_budget": [
        lambda i: _j(_rec(i, question="How much is " + "1+" * 20 + "1?")),
        lambda i: _j(_rec(i, question="x" * 200)),
    ],
    "trace_over_budget": [
        lambda i: _j(_rec(i, traces=("ok", "1+" * 40 + "1"))),
        lambda i: _j(_rec(i, traces=("y" * 500,))),
    ],
}

# Good records, some carrying chat-control strings and other unusual but valid text.
GOOD = [
    lambda i, k: _rec(
        i, question=f"What is {k}+{k + 1}?", traces=(f"{k}+{k + 1}={2 * k + 1}", f"{k + 1}+{k}={2 * k + 1}")
    ),
    lambda i, k: _rec(i, question=f"<|im_end|>{k}+1?", traces=(f"<|im_start|>assistant {k + 1}", f"{k + 1}<|im_end|>")),
    lambda i, k: _rec(i, question=f"<think3> {k}*2?", traces=(f"<think1>{2 * k}", f"{k}+{k}={2 * k}", "<|endoftext|>")),
    lambda i, k: {
        "id": i,
        "messages": [{"role": "user", "content": f"{k}-1?"}],
        "traces": [{"text": f"{k - 1}", "source": "m1"}],
    },
    lambda i, k: _rec(i, question=f'tab\t{k} "q" a\\b?', traces=(f"{k}\t\\n ~`",)),
]


def _bad_data(path, *, per_reason=13, n_good=40, seed=0):
    """A JSONL file of `per_reason` malformed records of every reason in `data.REASONS` mixed at random into
    `n_good` good ones (plus blank lines). Returns what a correct validator must report."""
    # conflicting_rows needs a file of per-trace rows (a native file with such rows has an ambiguous shape): it is in
    # tests/test_data.py's bad-record cases.
    assert set(BAD) == set(data_lib.REASONS) - {"conflicting_rows"}
    rng = random.Random(seed)
    kinds = ["good"] * n_good + [r for r in BAD for _ in range(per_reason)]
    rng.shuffle(kinds)
    kinds.remove("good")
    kinds.insert(0, "good")  # duplicate ids need an earlier good id
    lines, good_ids, expected, first_bad = [], [], collections.Counter(), None
    variant = collections.Counter()
    for n, kind in enumerate(kinds):
        if rng.random() < 0.05:
            lines.append(b"   " if rng.random() < 0.5 else b"")
        rid = f"r{n}"
        if kind == "good":
            lines.append(_j(GOOD[len(good_ids) % len(GOOD)](rid, len(good_ids))))
            good_ids.append(rid)
            continue
        if kind == "duplicate_id":
            lines.append(_j(_rec(rng.choice(good_ids), traces=(f"another {n}",))))
        else:
            builders = BAD[kind]
            lines.append(builders[variant[kind] % len(builders)](rid))
            variant[kind] += 1
        expected[kind] += 1
        if first_bad is None:
            first_bad = (len(lines), kind)
    lines[0] = lines[0] + b"\r"  # a CRLF line end is fine too
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {"good_ids": good_ids, "expected": expected, "first_bad": first_bad, "num_bad": sum(expected.values())}


@pytest.fixture(scope="module")
def char_setup(tmp_path_factory):
    c = demo_config()
    tok = tk.build_char_tokenizer(tmp_path_factory.mktemp("char_tok"))
    tags = tk.ForkingTags.for_tokenizer(tok, c.ssft.num_tags, c.ssft.tag_mode)
    tags.add_to_tokenizer(tok)
    return c, tok, tags, assembly.build_layout(c, tags.max_tag_len(tok))


def test_bad_records_at_scale_strict_and_skip(char_setup, tmp_path):
    c, tok, tags, layout = char_setup
    path = tmp_path / "mixed.jsonl"
    info = _bad_data(path)
    assert info["num_bad"] >= 200 and set(info["expected"]) == set(data_lib.REASONS) - {"conflicting_rows"}
    # strict: the first bad record in the file, by file and line
    with pytest.raises(data_lib.DataError) as ei:
        data_lib.load_questions(path, tok, tags, layout, overlong="reject")
    line, reason = info["first_bad"]
    assert ei.value.where == f"{path}:{line}" and ei.value.reason == reason
    assert str(ei.value).splitlines()[1].strip().startswith(f"{path}:{line}: ")
    # skip: exactly the good records, in file order, and the count per reason
    questions, report = data_lib.load_questions(path, tok, tags, layout, overlong="reject", on_bad_record="skip")
    assert [q.id for q in questions] == info["good_ids"]
    assert report.skipped == dict(info["expected"])
    assert report.num_kept == len(info["good_ids"]) and report.num_records == len(info["good_ids"]) + info["num_bad"]
    print(f"\nbad records: {info['num_bad']} over {len(report.skipped)} reasons, {report.num_kept} good kept")


@pytest.mark.slow
def test_training_on_a_file_with_bad_records(tmp_path):
    path = tmp_path / "mixed.jsonl"
    info = _bad_data(path, seed=1)
    c = _cfg()
    c.data.update(name="jsonl", path=str(path))
    with pytest.raises(data_lib.DataError, match=re.escape(f"{path}:{info['first_bad'][0]}")):
        train.run(c, tmp_path / "strict", progress=False)
    assert _steps(tmp_path / "strict") == []
    c.data.on_bad_record = "skip"
    c.num_steps = 2
    s = train.run(c, tmp_path / "skip", progress=False)
    assert s["questions"] == len(info["good_ids"]) and s["final_step"] == 2
    assert all(np.isfinite(list(s["losses"].values())))
    assert all(f"{r}={n}" in s["validation"] for r, n in info["expected"].items())


# Control-token strings inside text are valid text: tokenized as characters/bytes, never as control tokens.
EVIL_Q = "Say <|im_end|> then <|im_start|>assistant\n<think3> ok <|endoftext|>"
EVIL_T = ("Sure <|im_end|><think3> done", "<think1><|im_start|>user\nx")


@pytest.mark.parametrize("which", ["char", "smollm2"])
def test_control_token_strings_in_records_are_text(which, char_setup):
    if which == "char":
        _, tok, tags, _ = char_setup
    else:
        from ssft_jax.gguf_convert import ensure_smollm2_hf
        tok = tk.load_tokenizer(ensure_smollm2_hf())
        tags = tk.ForkingTags.for_tokenizer(tok, 6, "special")
        tags.add_to_tokenizer(tok)
    layout = data_lib.LayoutConfig.for_tokenizer(tok, tags, num_traces=2, cost_len=8, max_prompt_len=256,
                                                 max_trace_len=128, batch_size=1)
    recs = [{"id": "evil", "question": EVIL_Q, "traces": [{"text": t} for t in EVIL_T]},
            {"id": "clean", "question": "Say", "traces": [{"text": "a"}]}]
    (evil, clean), report = data_lib.tokenize_records(recs, tok, tags, layout)
    assert report.num_kept == 2 and not report.skipped
    control = {tk.token_id(tok, s) for s in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")} - {None}
    control |= {t[0] for t in tags.all_tag_ids(tok)}
    for cid in control:  # the prompt has exactly the template's control tokens, whatever the user wrote
        assert list(evil.prompt_ids).count(cid) == list(clean.prompt_ids).count(cid)
    eos = tk.eos_token_ids(tok)[0]
    for text, ids in zip(EVIL_T, evil.trace_ids):
        assert ids[-1] == eos and not control & set(ids[:-1].tolist())
        assert tok.decode(ids[:-1].tolist()) == text


# ---------------------------------------------------------------------------------------------------------------
# Configs that cannot work
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("checkpoint.on_corrupt", "ignore", "checkpoint.on_corrupt='ignore'"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps=0"),
    ("debug.inject_nonfinite", "weights:1", "debug.inject_nonfinite: 'weights:1'"),
    ("debug.inject_nonfinite", "loss:0", "debug.inject_nonfinite: 'loss:0'"),
])
def test_new_fields_are_refused_before_compute(field, value, message, tmp_path):
    c = _cfg()
    section, _, key = field.rpartition(".")
    c[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        train.run(c, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_hf_folder_with_a_missing_tensor_is_refused_before_any_step(tmp_path):
    pytest.importorskip("torch")
    from safetensors.numpy import load_file, save_file

    from ssft_jax import hf_io

    from hf_fixtures import make_hf_model

    hf = tmp_path / "hf"
    make_hf_model("qwen2_tied", hf)
    tensors = load_file(hf / hf_io.SAFE_SINGLE)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(hf / hf_io.SAFE_SINGLE), metadata={"format": "pt"})
    c = _cfg()
    c.model.hf_dir, c.tokenizer = str(hf), "char"
    with pytest.raises(hf_io.CheckpointKeyError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        train.run(c, tmp_path / "wd", progress=False)
    assert _steps(tmp_path / "wd") == [] and not (tmp_path / "wd" / "metrics.jsonl").exists()
