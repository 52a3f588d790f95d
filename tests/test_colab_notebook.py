"""launch/colab_quickstart.ipynb runs top to bottom on CPU (the tiny-model fallback path), executed with nbclient in
a kernel on this interpreter, from the repository root."""
import json
import os
import pathlib
import re
import sys
import time

import pytest
from conftest import xla_flags_for_one_device

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_quickstart.ipynb"


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif out.get("output_type") in ("execute_result", "display_data"):
                parts.append(out.get("data", {}).get("text/plain", ""))
            elif out.get("output_type") == "error":
                parts.append("ERROR " + out.get("ename", "") + ": " + out.get("evalue", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_colab_quickstart_runs_on_cpu(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    # A kernel spec of our own, pinned to this interpreter (the venv), so no system-wide 'python3' kernel is used.
    spec_dir = tmp_path / "kernels" / "ssft-venv"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ssft-jax venv", "language": "python"}))
    km = KernelManager(kernel_name="ssft-venv",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))

    env = dict(os.environ)
    # A plain CPU runtime, as on Colab without an accelerator: no fake host devices (conftest adds 8 for the suite).
    env["XLA_FLAGS"] = xla_flags_for_one_device()
    # The repository the way the README tells a Colab user to bring it: `make colab-zip`, uploaded to /content (here
    # a temporary folder), opened from a working directory that is not the repository.
    from launch import colab_zip
    content, elsewhere = tmp_path / "content", tmp_path / "elsewhere"
    elsewhere.mkdir()
    colab_zip.write_zip(content / "ssft-jax.zip")
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SSFT_NOTEBOOK_SKIP_INSTALL="1",
               SSFT_NOTEBOOK_WORKDIR=str(tmp_path / "run"), SSFT_NOTEBOOK_CONTENT=str(content), TQDM_DISABLE="1")
    for key in ("SSFT_NOTEBOOK_MODE", "SSFT_REPO_DIR", "SSFT_REPO_URL", "PYTHONPATH"):
        env.pop(key, None)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, km=km, timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": str(elsewhere)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=env, cwd=str(elsewhere))
    except nbclient.exceptions.CellExecutionError as e:  # pragma: no cover - the message names the cell
        pytest.fail(f"a notebook cell failed:\n{e}")
    seconds = time.perf_counter() - t0
    text = _outputs_text(nb)
    print(text)
    print(f"notebook executed in {seconds:.1f}s")

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, text
    assert "SSFT_NOTEBOOK_SKIP_INSTALL is set: no installs" in text
    assert f"unpacked {content / 'ssft-jax.zip'} -> {content / 'ssft-jax'}" in text
    assert f"repository: {content / 'ssft-jax'}" in text
    assert "CPU fallback: tiny from-scratch model" in text
    assert "METRICS on 8 held-out questions: Pass@1[<think1>] = " in text and "Cons@N (native, N=6) = " in text
    assert "tag -> strategy" in text and "left_to_right" in text
    assert "ROUND TRIP OK" in text and "max |trained - reloaded| = 0" in text
    assert (tmp_path / "run" / "hf_export" / "model.safetensors").exists()
    # The LoRA path: the 7B plans (one v5e chip does not fit, four do), a LoRA run from the export above.
    assert "Qwen2.5-7B LoRA on v5litepod-1" in text and "does not fit on v5e" in text
    assert re.search(r"Qwen2.5-7B LoRA on v5litepod-4: .* -> fits on v5e", text), text
    assert "LORA OK: 10 steps" in text and "adapter_config.json" in text
    assert (tmp_path / "run" / "lora" / "lora_adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "summary.json").exists()
    assert seconds < 120, f"the CPU path should stay well under 2 minutes, took {seconds:.0f}s"


def test_the_notebooks_tpu_settings_fit_the_chip_by_the_planner():
    """The Qwen2.5-0.5B path (configs/qwen2p5_0p5b.py:colab) on a Colab TPU: one v5e chip (16 GiB) trains LoRA and
    fits with headroom (full fine-tuning needed 17.4 GiB); more chips fine-tune fully with FSDP and fit too."""
    from ssft_jax import memory_plan
    from ssft_jax.config import load_config
    for chips in (1, 2, 4, 8):
        config = load_config("qwen2p5_0p5b", f"colab,chips={chips}")
        assert config.lora.enabled == (chips == 1)
        plan = memory_plan.make_plan(config, num_devices=chips)
        assert plan.total / 2**30 < 0.9 * memory_plan.CHIPS["v5e"], (chips, plan.total / 2**30)
    full = load_config("qwen2p5_0p5b", "colab,chips=1")
    full.lora.enabled, full.micro_batches = False, 1
    assert "does not fit on v5e" in memory_plan.verdict(memory_plan.make_plan(full, num_devices=1).total, "v5e")
    # the notebook loads exactly this variant, with the runtime's chip count
    nb = json.loads(NOTEBOOK.read_text())
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert 'load_config("qwen2p5_0p5b", f"colab,hf_dir={HF_DIR},chips={jax.device_count()}")' in code


def test_modules_replaced_by_pip_are_found():
    from launch.common import modules_replaced

    out = (
        "Collecting x\nSuccessfully installed jax-0.10.2 jaxlib-0.10.2 ml-collections-1.1.0 protobuf-7.1 tqdm-4.70.1\n"
    )
    assert modules_replaced({"jax", "jax._src", "google.colab", "os"}, out) == ["google", "jax"]
    assert modules_replaced({"numpy"}, out) == [] and modules_replaced({"jax"}, "Requirement already satisfied") == []
