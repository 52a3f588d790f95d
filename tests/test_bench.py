"""Every benchmark script runs (in its `--quick` mode), so none can rot unnoticed when the library changes.

Scripts are found by glob: a new `bench/*.py` with a `__main__` block is covered, and must offer `--quick`. They run
two at a time (the suite's 2 cores), each in its own process, as a user would start them."""
import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import xla_flags_for_one_device

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN_BLOCK = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)
FILES = sorted((ROOT / "bench").glob("*.py"))
SCRIPTS = [p for p in FILES if MAIN_BLOCK.search(p.read_text())]
# A line each quick run must print (its headline figure); a script not named here must print some table row.
EXPECTED = {
    "bench_data.py": r"\[pipeline\] \d+ batches after the first .* batches/s",
    "bench_decode.py": r"demo +shared +rows=.* decode +[\d.]+ tok/s",
    "bench_gfpo.py": r"(?s)\[timing\] grpo .* tok/s.*\| 2 x 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \|"
                     r".*\| 6 \| enumerate \| [\d.e+-]+ \| [\d.-]+ \|",
    "bench_forward.py": r"\| SmolLM2-135M \| 1 x \w+ \| 1 x 32 \| float32 \| [\d.]+ \| [\d.]+ \| \d+ \|",
    "bench_packing.py": r"(?s)\| longtail \| tokens \| \d+x4 \| .* \| [\d.]+% \| [\d.]+ of \d+ \| \d+ \| [\d.]+x \|"
                        r".*\| longtail \| [\d.]+ \| [\d.]+ \| [\d.]+ \|.*\| qwen2p5_32b \| packed ",
    "bench_qlora.py": r"(?s)\| nf4 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|.*\| nf4 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
    "bench_matching.py": r"\| 6x4 \| hungarian \| [\d.]+ \| [\d.]+ \| .* \| 100\.0% \| 100\.0% \|",
    # SmolLM2: the trainer's ssft/sft_mixed ratio beside its floor, and the PyTorch Llama row beside ours
    "bench_smollm2_step.py": r"(?s)ssft / sft_mixed = [\d.]+; FLOP floor .* = [\d.]+; measured / floor = [\d.]+"
                             r".*\| JAX \(ours, jitted\).*\| PyTorch transformers LlamaForCausalLM eager \| [\d.]+ \|",
    # the headline step, and the two cost layouts the step variants trace agreeing with the trainer's
    "bench_train_step.py": r"(?s)\| ssft \| [\d.]+ \| [\d.]+ \|.*\| repeated \| [\d.e+-]+ \| \d+/\d+ \|"
                           r".*\| prefix_cache \| [\d.e+-]+ \| \d+/\d+ \|",
}


# Scripts whose quick run a test file of their own makes (and checks more closely); not run twice.
OWN_TESTS = {"accelerator.py": "tests/test_accelerator.py"}


def test_the_benchmarks_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"bench_train_step.py", "bench_matching.py", "bench_data.py"} <= names
    # Anything else in bench/ is a helper that some script imports (not a script that would be skipped unseen).
    sources = "\n".join(p.read_text() for p in SCRIPTS)
    for helper in (p for p in FILES if p.name not in names):
        assert re.search(rf"^\s*(import|from) {helper.stem}\b", sources, re.M), f"{helper.name}: no __main__, unused"


def _run(script: pathlib.Path) -> subprocess.CompletedProcess:
    # one CPU device, as the scripts expect (with the suite's compile-time flags)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags_for_one_device()}
    return subprocess.run([sys.executable, str(script), "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def quick_runs(request):
    """The selected scripts' quick runs, started at once, two at a time; each test below waits for its own."""
    selected = {item.callspec.params["script"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bench_quick_mode_runs"}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {p.name: pool.submit(_run, p) for p in SCRIPTS if p in selected and p.name not in OWN_TESTS}
        yield futures
        for f in futures.values():
            f.cancel()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_quick_mode_runs(script, quick_runs):
    assert "--quick" in script.read_text(), f"{script.name} has no --quick mode"
    if script.name in OWN_TESTS:
        pytest.skip(f"run by {OWN_TESTS[script.name]}")
    proc = quick_runs[script.name].result()
    assert proc.returncode == 0, f"{script.name} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    expected = EXPECTED.get(script.name, r"^\|.*\d.*\|$")
    assert re.search(expected, proc.stdout, re.M), \
        f"{script.name} --quick printed no line matching {expected!r}:\n{proc.stdout[-3000:]}"
