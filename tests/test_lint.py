"""`ruff check` over the repository's code: pyflakes, import order and lines of at most 120 characters
(pyproject.toml, [tool.ruff]), so an unused import, a misplaced one or a long line fails the suite, not a review."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "ssft_jax", "bench", "tests", "launch",
                        "configs"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-2000:]


def test_the_config_is_the_one_checked():
    """The rules the docstring promises are the ones configured (a deleted section would pass everything)."""
    import tomllib
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == 120 and set(ruff["lint"]["select"]) >= {"F", "I", "E501"}
