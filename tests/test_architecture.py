"""The package's imports run one way: storage math -> kernels -> launcher -> autotuner -> modules ->
compression -> on-disk format and HF -> tools. Read with `ast`, so it holds without importing anything.

LAYERS is the one place the order is written. A new module must be added to it (the test fails until
it is), at the lowest layer whose modules it needs.
"""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "triton_lowrank"

LAYERS = [
    ("storage and reference math", ["quant", "factors", "reference", "hybrid_storage"]),
    ("kernels", ["kernels", "kernels.configs", "kernels.lowrank_matmul", "kernels.hybrid_matmul", "kernels.launch"]),
    ("launcher and custom op", ["ops"]),
    ("autotuner", ["autotune"]),
    ("modules", ["formats", "layers", "hybrid_layers", "pretune"]),
    ("compression", ["config", "calibration", "factorize", "gptq", "sequential", "compress", "hybrid_fit"]),
    ("on-disk format and HF", ["checkpoint_format", "hf_quantizer", "checkpoint"]),
    ("tools", ["embedded", "loading", "eval_data", "metrics", "realmodel", "smollm2", "baselines", "sweeps",
               "generation_bench", "demo", "cli", ""]),  # "" is the package's __init__, which exports from every layer
]
LAYER_OF = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}
# Imported inside functions on purpose: optional at import time (Triton is a Linux x86-64 dependency
# only; matplotlib and triton.testing are needed by plots and GPU benchmarks alone).
OPTIONAL = ("triton", "matplotlib")


def source_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT / PACKAGE).with_suffix("").parts
        files[".".join(p for p in parts if p != "__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):  # installed as triton_lowrank.kernels
        files[".".join(["kernels"] + ([path.stem] if path.stem != "__init__" else []))] = path
    return files


def package_imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for each import of our own package."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if n is not f}
    parts = module.split(".") if module else []
    package = parts if path.name == "__init__.py" else parts[:-1]  # what a relative import is relative to
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif node.module and node.module.split(".")[0] == PACKAGE:
                names = [node.module.removeprefix(PACKAGE).lstrip(".")]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix(PACKAGE).lstrip(".") for a in node.names if a.name.split(".")[0] == PACKAGE]
        for name in names:
            found.append((name, node.lineno, id(node) in in_function))
    return found


def resolve(name: str, files: dict[str, Path]) -> str:
    """The module a dotted import lands in (an imported name inside a module resolves to that module)."""
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name


def test_every_module_has_a_layer():
    missing = sorted(set(source_files()) - set(LAYER_OF))
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


@pytest.mark.parametrize("module", sorted(source_files()))
def test_imports_only_point_down(module):
    files = source_files()
    for name, line, _ in package_imports(module, files[module]):
        target = resolve(name, files)
        if target == module or target not in LAYER_OF:
            continue
        assert LAYER_OF[target] <= LAYER_OF[module], (
            f"{files[module].name}:{line} imports {target} ({LAYERS[LAYER_OF[target]][0]}) from "
            f"{LAYERS[LAYER_OF[module]][0]}: imports must point down the layers"
        )


def test_no_circle_within_a_layer():
    files = source_files()
    graph = {m: {resolve(n, files) for n, _, _ in package_imports(m, p)} - {m, ""} for m, p in files.items()}

    def visit(node, path):
        for nxt in graph.get(node, ()):
            assert nxt not in path, f"import circle: {' -> '.join([*path, nxt])}"
            visit(nxt, [*path, nxt])

    for module in graph:
        visit(module, [module])


@pytest.mark.parametrize("module", sorted(source_files()))
def test_no_imports_inside_functions_except_optional_dependencies(module):
    path = source_files()[module]
    tree = ast.parse(path.read_text())
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            assert all(n.split(".")[0] in OPTIONAL for n in names), (
                f"{path.name}:{node.lineno} imports {names} inside {func.name}(): import at the top of the module "
                "(only optional dependencies may be imported late)"
            )


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself can fail: an upward import written into a copy of a low module is caught."""
    fake = tmp_path / "quant.py"
    fake.write_text("from .compress import compress_model\n")
    (name, _, _), = package_imports("quant", fake)
    assert LAYER_OF[resolve(name, source_files())] > LAYER_OF["quant"]


def test_a_plain_checkout_imports_without_installing(tmp_path):
    """kernels/ lives at the top level but is triton_lowrank.kernels: a copy of the source tree on
    PYTHONPATH (no pip install, as on a GPU image without a package index) must import it from there."""
    copy = tmp_path / "checkout"
    for part in ("triton_lowrank", "kernels"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    code = "import triton_lowrank.kernels.launch as m, triton_lowrank.ops as o; print(m.__file__); print(o.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(copy)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(copy / "kernels" / "launch.py"), str(copy / "triton_lowrank" / "ops.py")]
