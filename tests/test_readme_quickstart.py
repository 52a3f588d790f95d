"""README's Quick start, run as written: its bash block is read from README.md and executed (the install line in the
repository, the rest from a fresh folder, as a user would after `source .venv/bin/activate`), so it cannot rot."""
import json
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    return [c for c in commands if c]


def test_quickstart_block_has_five_commands():
    commands = quickstart_commands()
    assert len(commands) == 5 and commands[0] == "make setup && source .venv/bin/activate"


def test_readme_quickstart_runs_as_written(tmp_path):
    install, *rest = quickstart_commands()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)
    # Line 1 in the repository. Under `make test` the set-up is done already and `make setup` returns at once; a
    # .venv older than the requirements is not rebuilt under the running suite (run `make setup` first).
    up_to_date = subprocess.run(["make", "--question", "setup"], cwd=ROOT, env=env).returncode == 0
    line1 = install if up_to_date else install.replace("make setup && ", "")
    script = "set -e\n" + f"cd {ROOT}\n{line1}\n" + f"cd {tmp_path}\n" + "\n".join(rest) + "\n"
    p = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    summary = json.loads((tmp_path / "runs" / "quick" / "summary.json").read_text())
    assert summary["final_step"] == 4 and summary["questions"] == 32  # 40 written, 8 held out
    metrics = json.loads((tmp_path / "runs" / "quick" / "eval" / "metrics.json").read_text())["metrics"]
    # 8 questions: 3 only choose the best fixed tag (evaluate's validation split), every figure is on the other 5
    assert metrics["num_questions"] == 5 and metrics["split"]["validation_questions"] == 3
    assert metrics["num_tags"] == 6
    assert "README.md" in p.stdout and "model.safetensors" in p.stdout  # `ls runs/quick/hf_export`
    assert "pass@1[tag 0]=" in p.stdout and re.search(r"^summary +runs/quick/summary.json$", p.stdout, re.M)
