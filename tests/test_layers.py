"""The shape of the package, checked: fvae's modules form layers with no cycles (every
import counted, those inside functions too), the CPU code is entered through one door,
and no function is longer than a screen and a bit."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fvae"

# Bottom to top. A module imports only from its own layer or the layers below it; the
# cycle test below keeps imports within one layer one-way.
LAYERS = [
    # configs, data, models, losses, random keys, and helpers that know none of them
    {"configs", "data", "models", "losses", "keys", "images", "batching", "binarize",
     "parallel", "runtime", "logs", "locking"},
    # the machine (CPU kernels and start-up), provenance, storage, the classifier
    {"cpu", "provenance", "checkpoint", "writer", "classifier"},
    # train state and steps; evaluation and figures of a model's parameters
    {"steps", "evaluate", "plots"},
    # one run's loop
    {"train"},
    # orchestration: a workdir's checkpoints evaluated or plotted, sweeps, comparisons,
    # benchmarks, and the command line
    {"runs", "sweep", "compare", "results", "bench", "launch", "__main__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Checkpoint I/O knows nothing about models, steps or runs.
CHECKPOINT_MAY_IMPORT = {"configs"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, pathlib.Path]:
    files = sorted(PACKAGE.rglob("*.py")) + [ROOT / "launch.py"]
    return {module_name(path): path for path in files}


MODULES = set(sources())


def fvae_imports(path: pathlib.Path) -> set[str]:
    """Every fvae module `path` imports, at the top or inside a function, as dotted
    names ('fvae.cpu', 'fvae.bench.common')."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "fvae"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "fvae":
            for alias in node.names:  # a submodule where one is named, else the module
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES or node.module == "fvae"
                          else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: use absolute imports (from fvae import ...)")
    return found


def unit(module: str) -> str:
    """The layering unit of a module: its top-level name inside fvae ('cpu' for
    fvae.cpu.kernels, 'launch' for launch.py)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "fvae" and len(parts) > 1 else parts[0]


GRAPH = {module: fvae_imports(path) for module, path in sources().items()}


def test_every_module_has_a_layer():
    missing = sorted({unit(m) for m in GRAPH} - set(LAYER_OF) - {"fvae"})
    assert not missing, f"add {missing} to a layer in LAYERS (and to README's layer section)"


def test_no_import_goes_up_a_layer():
    upward = [f"{module} imports {target}" for module, targets in GRAPH.items()
              for target in targets if unit(module) in LAYER_OF and unit(target) in LAYER_OF
              and LAYER_OF[unit(target)] > LAYER_OF[unit(module)]]
    assert not upward, upward


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the directed graph `edges`, as a path back to its start, or None."""
    def cycle_from(node, path):
        for target in sorted(edges.get(node, ())):
            if target in path:
                return path[path.index(target):] + [target]
            found = cycle_from(target, path + [target])
            if found:
                return found
        return None

    return next(filter(None, (cycle_from(start, [start]) for start in sorted(edges))), None)


def test_no_import_cycles():
    """Between layering units (fvae.cpu's and fvae.bench's modules count as one each)."""
    edges = {}
    for module, targets in GRAPH.items():
        edges.setdefault(unit(module), set()).update(
            unit(t) for t in targets if unit(t) != unit(module))
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}}) is None


def test_the_cpu_code_is_entered_through_one_door():
    """Outside fvae/cpu, only `fvae.cpu` itself is imported, never its modules."""
    inside = [f"{module} imports {target}" for module, targets in GRAPH.items()
              if unit(module) != "cpu" for target in targets
              if unit(target) == "cpu" and target != "fvae.cpu"]
    assert not inside, inside


def test_checkpoint_io_knows_nothing_about_models():
    assert {unit(t) for t in GRAPH["fvae.checkpoint"]} <= CHECKPOINT_MAY_IMPORT


def test_the_checker_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\nfrom fvae import configs\n\ndef f():\n"
                    "    from fvae.cpu import kernels\n    import fvae.train\n")
    assert fvae_imports(path) == {"fvae.configs", "fvae.cpu.kernels", "fvae.train"}


MAX_FUNCTION_LINES = 80
EXEMPT = {("fvae.configs", "get_base_config")}  # config defaults: data, not logic


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in sources().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    (module, node.name) not in EXEMPT:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


@pytest.mark.parametrize("name", sorted(LAYER_OF))
def test_every_named_unit_exists(name):
    """A layer lists only modules that exist (a rename shows up here)."""
    assert any(unit(module) == name for module in GRAPH), name


def test_importing_the_library_sets_no_matplotlib_backend():
    """A notebook's inline figures keep working after `from fvae import runs, train`:
    only drawing a figure imports matplotlib's pyplot (and sets the Agg backend)."""
    code = ("import sys; import fvae.train, fvae.runs, fvae.evaluate, fvae.steps; "
            "print('matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
