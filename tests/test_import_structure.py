"""The module graph of `ssft_jax`, read statically (every import, also those inside functions): no cycles, and the
arrows point down: generation, evaluation and planning never reach for the trainer."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "ssft_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = ["ssft_jax", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The ssft_jax module an imported dotted name lands in: the longest prefix that is a module or package."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            hit = _resolve(t) if t.startswith("ssft_jax") else None
            if hit and hit != module:
                out.add(hit)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _reaches(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in GRAPH[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_the_graph_is_read():
    # A sanity check of the reader itself, so the tests below cannot pass on an empty graph.
    assert "ssft_jax.assembly" in GRAPH["ssft_jax.train"]
    assert "ssft_jax.datasets.gsm8k" in GRAPH["ssft_jax.datasets.registry"]
    assert "ssft_jax.datasets.registry" in GRAPH["ssft_jax.datasets"]  # a relative import in a package __init__
    assert "ssft_jax.gguf_convert" in GRAPH["ssft_jax.assembly"]  # an import inside a function


def _cycle_through(start: str) -> list[str]:
    """One import path start -> ... -> start (breadth first, so the shortest)."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop(0)
        for n in sorted(GRAPH[path[-1]]):
            if n == start:
                return path + [n]
            if n not in seen:
                seen.add(n)
                paths.append(path + [n])
    return []


def test_no_import_cycle():
    # Edges go to the module an import names, so a package __init__ re-exporting its submodules is no cycle; a
    # submodule importing its own package (`from ssft_jax import data` inside ssft_jax/data/) is one, as at run time.
    cycles = sorted(m for m in GRAPH if m in _reaches(m))
    assert not cycles, f"modules on an import cycle: {cycles}, e.g. {' -> '.join(_cycle_through(cycles[0]))}"


@pytest.mark.parametrize("module", ["ssft_jax.sampling", "ssft_jax.evaluate", "ssft_jax.memory_plan",
                                    "ssft_jax.checkers", "ssft_jax.gfpo", "ssft_jax.tag_policy"])
def test_generation_evaluation_and_planning_do_not_import_the_trainer(module):
    direct = GRAPH[module] & {"ssft_jax.train", "ssft_jax.train_step"}
    assert not direct, f"{module} imports {direct}"


def test_the_model_and_the_solvers_are_leaves_below_the_run():
    for module in ("ssft_jax.model", "ssft_jax.matching", "ssft_jax.sampling", "ssft_jax.checkers"):
        assert not _reaches(module) & {"ssft_jax.train", "ssft_jax.train_step", "ssft_jax.assembly",
                                        "ssft_jax.config"}, module


def _third_party_imports(module: str) -> set[str]:
    """Top-level names of every non-ssft_jax package `module` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - {"ssft_jax"}


def test_the_data_package_is_host_side_only():
    """data/ holds numpy-side records, validation, layout arithmetic and the Grain pipeline: none of its modules
    imports jax (at module level or in a function); what the step does to rows in-graph is `ssft_jax.rows`."""
    data_modules = [m for m in MODULES if m == "ssft_jax.data" or m.startswith("ssft_jax.data.")]
    assert len(data_modules) >= 6  # the reader found the package
    offenders = {m: sorted(_third_party_imports(m) & {"jax", "jaxlib", "flax", "optax"}) for m in data_modules}
    assert not {m: v for m, v in offenders.items() if v}, offenders
    assert "jax" in _third_party_imports("ssft_jax.rows")  # the check can fail: the in-graph module does


def test_the_two_stages_do_not_import_each_other():
    """The SSFT trainer and GFPO share their loop's pieces through run_common / assembly, never each other."""
    assert "ssft_jax.gfpo" not in _reaches("ssft_jax.train") and "ssft_jax.train" not in _reaches("ssft_jax.gfpo")
    assert "ssft_jax.run_common" in GRAPH["ssft_jax.train"] & GRAPH["ssft_jax.gfpo"]


def test_no_production_code_reads_a_test_setting():
    """Test hooks are passed in (an option, a handler); nothing outside tests/ reads an SSFT_TEST_* variable."""
    root = PKG.parent
    sources = [p for d in ("ssft_jax", "bench", "launch", "configs") for p in (root / d).rglob("*.py")]
    assert len(sources) > 50
    readers = [str(p.relative_to(root)) for p in sources if "SSFT_TEST_" in p.read_text()]
    assert not readers, readers
