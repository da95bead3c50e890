"""The package layout: no import cycle inside dsmoe/, files and functions of readable size, the
checkpoint files free of dsmoe imports, and the n_experts/τ defaults stated once outside the schema."""

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsmoe"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def absolute(module, level, target, path):
    """The absolute name of `from <level dots><target> import ...` written in `module` (at `path`)."""
    if level == 0:
        return target
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module, path):
    """Every dsmoe module that `module` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, node.level, node.module, path)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else source)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module, path) for module, path in MODULES.items()}


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_dsmoe():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_imports_resolve():
    assert absolute("dsmoe.data.build", 2, "atomic", PACKAGE / "data" / "build.py") == "dsmoe.atomic"
    assert absolute("dsmoe.model", 1, "modeling_dsmoe", PACKAGE / "model" / "__init__.py") == "dsmoe.model.modeling_dsmoe"
    assert "dsmoe.model" in GRAPH["dsmoe.losses"] and "dsmoe.atomic" in GRAPH["dsmoe.data.build"]


def test_checkpoint_files_import_only_torch_transformers_and_siblings():
    """These files are copied next to every checkpoint for trust_remote_code=True loading: besides
    torch, transformers and each other, they may import only the standard library (always there)."""
    files = ("configuration_dsmoe", "modeling_dsmoe", "sparse_ffn", "configuration_pruned_llama", "modeling_pruned_llama")
    for name in files:
        path = PACKAGE / "model" / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in files, path
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                allowed = {"torch", "transformers", *sys.stdlib_module_names}
                assert all(r.split(".")[0] in allowed for r in roots), f"{path}: {roots}"


def test_the_workflows_parse_imports_no_torch():
    """The Snakefile's parse (every snakemake run, twice in every cluster job) imports these modules: they
    load without torch, transformers or pandas (dsmoe/__init__.py and dsmoe/evaluation/__init__.py load
    their names on first use), and the package's names still resolve."""
    import subprocess

    code = ("import sys, dsmoe.config, dsmoe.launch, dsmoe.names, dsmoe.evaluation.harness; "
            "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    import dsmoe
    from dsmoe import names
    from dsmoe.model import configuration_dsmoe

    assert names.VARIANTS == configuration_dsmoe.VARIANTS == dsmoe.VARIANTS
    assert names.TOPK_VARIANTS == configuration_dsmoe.TOPK_VARIANTS
    assert all(getattr(dsmoe, name) is not None for name in dsmoe.__all__)
    import dsmoe.convert

    assert callable(dsmoe.convert)  # the submodule's import bound the module there: calling it converts


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_file_and_function_sizes(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_FILE_LINES, f"{path} has {len(lines)} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} has {length} lines"


def test_n_experts_and_tau_defaults_stated_once_outside_the_schema():
    """Defaults come from the schema (the CLI, via dsmoe.config.schema_default) or from DSMoEConfig,
    which states them once because it travels with checkpoints and cannot read the schema."""
    patterns = {"n_experts": re.compile(r"n_experts\s*(:\s*int\s*)?=\s*8\b|n.experts.*default\s*=\s*8\b"),
                "tau": re.compile(r"\btau\s*(:\s*float\s*)?=\s*0\.5\b|tau.*default\s*=\s*0\.5\b")}
    for key, pattern in patterns.items():
        hits = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py")
                for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
        assert len(hits) <= 1, f"the default of {key} is stated in {hits}"
