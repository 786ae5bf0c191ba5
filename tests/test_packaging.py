"""The wheel a plain `pip install .` builds carries the recipe files, the typing marker and the entry points."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_recipe_file_inside_the_package(tmp_path):
    # Build from a clean copy: an editable install leaves memkit.egg-info (and maybe build/) in the tree,
    # from which setuptools would add packages that pyproject's list forgets, as a fresh clone would not.
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".venv", "build", "*.egg-info", "site", ".*_cache", "__pycache__", ".git")
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("memkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {p.name for p in (ROOT / "recipes").glob("*.toml")}
    assert recipes >= {"memoryllm.toml", "mplus.toml", "training-free.toml"}
    assert {f"memkit/recipes/{name}" for name in recipes} <= names
    assert "memkit/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "memkit-demo = memkit.demo:main" in text and "memkit = memkit.cli:main" in text
    # every module of the source tree is in the wheel (a subpackage missing from pyproject's list is not)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "memkit").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
