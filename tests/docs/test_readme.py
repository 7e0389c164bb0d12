"""The README and the docs run as written: every ```python block of README.md and of every docs/*.md page executes,
every `vtok.…` name they (and CONTRIBUTING.md) mention exists, the README stays a short entry point that links every
docs page and lists every registered method once, and README, CONTRIBUTING and docs/ point only at files (and
headings) inside the repository. CONTRIBUTING.md's skeleton is not run: it would register a method for the session."""

import importlib
import re
from pathlib import Path

import pytest

import vtok

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
TEXT = README.read_text()


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _names(text: str) -> list[str]:
    """Dotted vtok names in code (inline spans and ```python blocks), e.g. `vtok.bench.load_eval_vit()`; not
    `vit._vtok_state`."""
    code = re.findall(r"`[^`\n]+`", text) + _blocks(text)
    return sorted(set(re.findall(r"(?<![\w./])vtok(?:\.[A-Za-z_]\w*)+", "\n".join(code))))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


BLOCKS = _blocks(TEXT)
NAMES = _names(TEXT)
DOC_BLOCKS = [pytest.param(code, id=f"{_rel(p)}:{i + 1}")
              for p in DOCS for i, code in enumerate(_blocks(p.read_text()))]
REQUIRED = ["vtok.bench.load_eval_vit", "vtok.load_tokenizer", "vtok.patch", "vtok.unpatch", "vtok.compress",
            "vtok.methods"]
# the pages the README's examples moved to: each must keep runnable examples
PAGES_WITH_EXAMPLES = ["docs/eval-models.md", "docs/sweeps.md", "docs/tokenizers.md", "docs/usage.md", "docs/video.md",
                       "docs/wrap.md"]


def _resolve(dotted: str):
    """The object ``dotted`` names, importing submodules on the way as ``import vtok.x`` would."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):
            importlib.import_module(".".join(parts[: i + 1]))  # ModuleNotFoundError if it is not a module either
        obj = getattr(obj, part)
    return obj


def _run(code: str, where: str) -> None:
    # each block must be self-contained (it defines what it uses), so it runs in an empty namespace
    exec(compile(code, where, "exec"), {"__name__": re.sub(r"\W", "_", where)})


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "README.md lost its runnable examples"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i):
    _run(BLOCKS[i], f"README.md python block {i + 1}")


def test_docs_pages_keep_their_examples():
    with_blocks = {_rel(p) for p in DOCS if _blocks(p.read_text())}
    assert set(PAGES_WITH_EXAMPLES) <= with_blocks, "a docs page lost its runnable examples"


@pytest.mark.parametrize("code", DOC_BLOCKS)
def test_docs_python_block_runs(code, request):
    _run(code, f"{request.node.callspec.id} python block")


def test_readme_names_exist():
    assert set(REQUIRED) <= set(NAMES), f"README.md no longer mentions {sorted(set(REQUIRED) - set(NAMES))}"
    for name in sorted(set(NAMES) | set(REQUIRED)):
        assert _resolve(name) is not None, name
    assert callable(vtok.bench.load_eval_vit)  # as the README calls it, after `import vtok`


@pytest.mark.parametrize("page", [*DOCS, CONTRIBUTING], ids=_rel)
def test_docs_names_exist(page):
    for name in _names(page.read_text()):
        assert _resolve(name) is not None, f"{_rel(page)}: {name}"


def test_readme_is_an_entry_point():
    """At most 150 lines; no prose line over 120 characters (code blocks and tables aside); every docs page and
    CONTRIBUTING.md linked; a Results section that points at docs/benchmarks.md."""
    lines = TEXT.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"
    in_code, long = False, []
    for n, line in enumerate(lines, start=1):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and not line.startswith("|") and len(line) > 120:
            long.append(n)
    assert not long, f"README.md lines over 120 characters: {long}"
    linked = {target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", TEXT)}
    missing = [_rel(p) for p in [*DOCS, CONTRIBUTING] if _rel(p) not in linked]
    assert not missing, f"README.md does not link {missing}"
    results = re.search(r"^## Results\n(.*?)^## ", TEXT, flags=re.S | re.M)
    assert results and "(docs/benchmarks.md)" in results.group(1)


def test_readme_method_table_lists_every_method_once():
    section = TEXT.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]  # the model-family table looks alike
    rows = re.findall(r"^\| (\w+) \| `(\w+)` \|", section, flags=re.M)
    names = [name for _, name in rows]
    assert sorted(names) == sorted({m.name for m in vtok.methods()}), "README.md's method table is out of date"
    assert all(vtok.get_method(name).family == family for family, name in rows)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_links_point_inside_the_repository():
    """Every relative link of README, CONTRIBUTING and docs/*.md names an existing file, and a heading that exists."""
    broken = []
    for page in [README, CONTRIBUTING, *DOCS]:
        prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http(s):, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or ROOT not in dest.parents or (
                    anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
                broken.append(f"{_rel(page)}: {target}")
    assert not broken, f"broken links: {broken}"


def test_no_references_outside_the_repository():
    files = [README, CONTRIBUTING] + sorted(p for p in (ROOT / "docs").rglob("*") if p.is_file())
    offenders = [_rel(p) for p in files if b"../shared" in p.read_bytes()]
    assert not offenders, f"these files point outside the repository (../shared): {offenders}"
    assert "docs/architecture.md" in TEXT and (ROOT / "docs" / "architecture.md").is_file()
