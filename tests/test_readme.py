"""The README runs as written: every ```python block executes, every `vtok.…` name it mentions exists, and the
README and docs/ point only at files inside the repository."""

import importlib
import re
from pathlib import Path

import pytest

import vtok

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)
# dotted vtok names in code (inline spans and blocks), e.g. `vtok.bench.load_eval_vit()`; not `vit._vtok_state`
NAMES = sorted(set(re.findall(r"(?<![\w./])vtok(?:\.[A-Za-z_]\w*)+", "\n".join(re.findall(r"`[^`\n]+`", TEXT)
                                                                               + BLOCKS))))
REQUIRED = ["vtok.bench.load_eval_vit", "vtok.load_tokenizer", "vtok.patch", "vtok.unpatch", "vtok.compress",
            "vtok.methods"]


def _resolve(dotted: str):
    """The object ``dotted`` names, importing submodules on the way as ``import vtok.x`` would."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):
            importlib.import_module(".".join(parts[: i + 1]))  # ModuleNotFoundError if it is not a module either
        obj = getattr(obj, part)
    return obj


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "README.md lost its runnable examples"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i):
    # each block must be self-contained (it defines what it uses), so it runs in an empty namespace
    code = compile(BLOCKS[i], f"README.md python block {i + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{i + 1}"})


def test_readme_names_exist():
    assert set(REQUIRED) <= set(NAMES) | set(REQUIRED)  # the list below is checked whether or not it is mentioned
    for name in sorted(set(NAMES) | set(REQUIRED)):
        assert _resolve(name) is not None, name
    assert callable(vtok.bench.load_eval_vit)  # as the README calls it, after `import vtok.bench`


def test_no_references_outside_the_repository():
    files = [README] + sorted(p for p in (ROOT / "docs").rglob("*") if p.is_file())
    offenders = [str(p.relative_to(ROOT)) for p in files if b"../shared" in p.read_bytes()]
    assert not offenders, f"these files point outside the repository (../shared): {offenders}"
    assert "docs/architecture.md" in TEXT and (ROOT / "docs" / "architecture.md").is_file()
