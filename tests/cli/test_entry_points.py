"""Every script runs the way the README says, and none of our module names hides an installed package.

``python -m benchmarks.NAME`` and ``python -m scripts.train.NAME`` put the repository root first on ``sys.path``;
``python demos/NAME.py`` puts ``demos/``. A module there named like an installed package hides that package from
everything the script imports (``benchmarks/kernels.py`` once hid ``kernels``, which transformers imports).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_PACKAGES = ("benchmarks", "scripts/train")  # run as `python -m PACKAGE.NAME` from the repository root
MODULES = sorted(f"{pkg.replace('/', '.')}.{p.stem}" for pkg in SCRIPT_PACKAGES for p in (ROOT / pkg).glob("*.py")
                 if p.stem != "__init__")
DEMOS = sorted(p.stem for p in (ROOT / "demos").glob("*.py"))

# Run in the child: the script with the documented sys.path[0], its --help, then transformers' modelling code (and
# the `kernels` package where installed) imported in the same process with the same sys.path.
CHILD = """
import runpy, sys
kind, name = sys.argv[1], sys.argv[2]
sys.argv = [name, "--help"]
if kind == "module":  # python -m PACKAGE.NAME: sys.path[0] is the working directory (the repository root)
    sys.path[0] = ""
    run = lambda: runpy.run_module(name, run_name="__main__", alter_sys=True)
else:  # python demos/NAME.py: sys.path[0] is the script's folder
    sys.path[0] = "demos"
    run = lambda: runpy.run_path("demos/" + name + ".py", run_name="__main__")
try:
    run()
except SystemExit as e:
    assert e.code in (0, None), f"--help exited {e.code}"
import importlib.util
import transformers
import transformers.modeling_utils
if importlib.util.find_spec("kernels") is not None:
    import kernels
    assert "site-packages" in kernels.__file__, kernels.__file__
print("TRANSFORMERS", transformers.__version__)
"""


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _installed_names() -> dict[str, str]:
    """Normalised distribution names and top-level module names of every installed distribution → the distribution."""
    names: dict[str, str] = {}
    for dist in md.distributions():
        dname = dist.metadata["Name"] or ""
        if _normal(dname) == "vtok":
            continue
        names[_normal(dname)] = dname
        top = dist.read_text("top_level.txt") or ""
        for mod in top.split():
            names[_normal(mod)] = dname
    for mod, dists in md.packages_distributions().items():
        for d in dists:
            if _normal(d) != "vtok":
                names.setdefault(_normal(mod), d)
    return names


@pytest.mark.parametrize("kind,name", [("module", n) for n in MODULES] + [("demo", n) for n in DEMOS])
def test_script_help_with_transformers_in_the_same_process(kind, name):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # vlm_prefill re-executes itself without it
    res = subprocess.run([sys.executable, "-c", CHILD, kind, name], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage:" in res.stdout.lower() or "usage:" in res.stderr.lower(), res.stdout[-1000:]
    assert "TRANSFORMERS" in res.stdout


@pytest.mark.parametrize("cmd", [["-m", "benchmarks.vlm_prefill", "--help"], ["demos/wrap_vlm.py", "--help"]])
def test_documented_command_runs(cmd):
    res = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage:" in res.stdout.lower()


def test_no_module_of_ours_is_named_like_an_installed_package():
    installed = _installed_names()
    folders = ("benchmarks", "demos", "scripts", "scripts/train", "tests", "tests/helpers")
    ours = {f"{folder}/{p.name}": p.stem for folder in folders for p in (ROOT / folder).glob("*.py")
            if p.stem != "__init__"}
    ours |= {p.name: p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}  # packages
    ours |= {p.name: p.stem for p in ROOT.glob("*.py")}
    clashes = {path: installed[_normal(stem)] for path, stem in ours.items() if _normal(stem) in installed}
    assert not clashes, f"these names hide installed distributions: {clashes}"


def test_script_folders_are_packages_without_path_hacks():
    for pkg in SCRIPT_PACKAGES:
        folder = ROOT / pkg
        while folder != ROOT:  # the folder and each one above it is a package: `python -m` needs no path set-up
            assert (folder / "__init__.py").exists(), folder
            folder = folder.parent
    for name in MODULES:
        text = (ROOT / f"{name.replace('.', '/')}.py").read_text()
        assert "sys.path.insert" not in text and "sys.path.append" not in text, name
