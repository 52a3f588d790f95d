"""The repository as one zip for a Colab runtime (upload it to /content; launch/colab_quickstart.ipynb unpacks it):
every file git tracks or would track (untracked files that are not ignored included, so uncommitted work goes too),
under `ssft-jax/`.

    python -m launch.colab_zip [dist/ssft-jax.zip]        (make colab-zip)
"""
from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PREFIX = "ssft-jax"


def repo_files(root: pathlib.Path = ROOT) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (root / f).is_file())


def write_zip(dest: str | pathlib.Path, root: pathlib.Path = ROOT) -> pathlib.Path:
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for f in repo_files(root):
            z.write(root / f, f"{PREFIX}/{f}")
    return dest


if __name__ == "__main__":
    path = write_zip(sys.argv[1] if len(sys.argv) > 1 else ROOT / "dist" / "ssft-jax.zip")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): upload it to /content in Colab, then Run all")
