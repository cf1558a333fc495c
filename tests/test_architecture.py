"""The package's imports run one way, down the floors of LAYERS (core storage math -> kernels -> core launcher,
format contract, config and tuner -> core fitting math -> formats -> compression -> on-disk format and HF -> tools),
formats never import each other, and no format's knobs are branched on outside its own package. Read with `ast`
and text, so it holds without importing anything.

LAYERS is the one place the order is written. A new module must be added to it (the test fails until
it is), at the lowest layer whose modules it needs.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "triton_lowrank"
# The `triton-lowrank` entry point and argument parser: a top-level module beside the package (importing
# anything inside the package runs its __init__, i.e. torch and transformers), standard library only, so that
# --help and argument errors answer at once. It imports the package inside main(), once the arguments parse:
# the one import of our own package allowed inside a function.
ENTRY = "triton_lowrank_cli"

LAYERS = [
    ("core: storage and reference math", ["core.safe_io", "core.quant", "core.nbytes", "core.factors",
                                          "core.reference", "core.cpu_kernels"]),
    ("kernels", ["kernels.configs", "kernels.utils", "kernels.lowrank_matmul", "kernels.hybrid_matmul",
                 "kernels.launch"]),
    ("core: launcher, format contract, config, tuner", ["core.ops", "core.format", "core.config", "core.autotune"]),
    ("core: fitting math", ["core.calibration", "core.factorize", "core.gptq"]),
    ("formats (each imports the core, never another format)",
     ["formats", "formats.lowrank", "formats.lowrank.op", "formats.lowrank.layer", "formats.lowrank.fit",
      "formats.hybrid", "formats.hybrid.storage", "formats.hybrid.cpu", "formats.hybrid.op", "formats.hybrid.layer",
      "formats.hybrid.fit"]),
    ("compression", ["compression", "compression.sequential", "compression.compress", "compression.pretune"]),
    ("on-disk format and HF", ["checkpoint", "checkpoint.format", "checkpoint.hf_quantizer", "checkpoint.save_load"]),
    ("tools", ["embedded", "tools", "tools.loading", "tools.eval_data", "tools.metrics", "tools.realmodel",
               "tools.baselines", "tools.sweeps", "tools.generation_bench", "tools.demo", "tools.cli", "tools.sharding",
               "tools.vllm_plugin", "tools.smollm2",
               "core", ""]),  # "" is the package's __init__, which exports from every layer; "core"'s is empty
    ("command-line entry", [ENTRY]),
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
    files[ENTRY] = ROOT / f"{ENTRY}.py"
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
            late_entry = module == ENTRY and func.name == "main" and all(n.split(".")[0] == PACKAGE for n in names)
            assert late_entry or all(n.split(".")[0] in OPTIONAL for n in names), (
                f"{path.name}:{node.lineno} imports {names} inside {func.name}(): import at the top of the module "
                "(only optional dependencies may be imported late)"
            )


def test_the_entry_point_imports_only_the_standard_library():
    """Module-level imports of triton_lowrank_cli are standard library (tests/test_cli.py runs --help and checks)."""
    tree = ast.parse((ROOT / f"{ENTRY}.py").read_text())
    top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    top += [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and not n.level]
    assert top and all(name.split(".")[0] in sys.stdlib_module_names for name in top), top


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself can fail: an upward import written into a copy of a low module is caught."""
    fake = tmp_path / "quant.py"
    fake.write_text("from triton_lowrank.compression.compress import compress_model\n")
    (name, _, _), = package_imports("core.quant", fake)
    assert LAYER_OF[resolve(name, source_files())] > LAYER_OF["core.quant"]


def test_a_plain_checkout_imports_without_installing(tmp_path):
    """kernels/ lives at the top level but is triton_lowrank.kernels: a copy of the source tree on
    PYTHONPATH (no pip install, as on a GPU image without a package index) must import it from there."""
    copy = tmp_path / "checkout"
    for part in ("triton_lowrank", "kernels"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    code = ("import triton_lowrank.kernels.launch as m, triton_lowrank.core.ops as o; print(m.__file__); "
            "print(o.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(copy)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(copy / "kernels" / "launch.py"),
                                     str(copy / "triton_lowrank" / "core" / "ops.py")]


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_the_kernels_folder_never_shadows_an_installed_kernels_package(where, tmp_path):
    """kernels/ has no __init__.py, so a Python started in the checkout still imports an installed regular
    package named `kernels` (Hugging Face's, which transformers imports) and not our folder."""
    code = ("import importlib.util, transformers, triton_lowrank, triton_lowrank.kernels.launch as k; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(k.__file__); print(spec.origin if spec else 'absent')")
    cwd = ROOT if where == "repo root" else tmp_path
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours, installed = result.stdout.split()
    assert ours == str(ROOT / "kernels" / "launch.py")
    assert installed == "absent" or not installed.startswith(str(ROOT / "kernels")), installed
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py makes the folder shadow `kernels`"


def test_formats_never_import_each_other():
    files = source_files()
    for module, path in files.items():
        parts = module.split(".")
        if parts[0] != "formats" or len(parts) < 2:
            continue
        for name, line, _ in package_imports(module, path):
            target = resolve(name, files).split(".")
            assert target[0] != "formats" or len(target) < 2 or target[1] == parts[1], (
                f"{path.name}:{line} ({module}) imports {'.'.join(target)}: a format imports the core, never "
                "another format"
            )


# The fork this layout removed: code outside the hybrid format branching on whether a config or problem has a base.
FORK = re.compile(r"""base_bits\b["')\]]*\s+is\s+(not\s+)?None""")


def test_no_format_fork_outside_its_own_package():
    forks = []
    for folder in ("triton_lowrank", "kernels", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if (ROOT / PACKAGE / "formats" / "hybrid") in path.parents:
                continue
            forks += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                      if FORK.search(line)]
    assert not forks, f"branch on the format's object instead (core/format.py): {forks}"


def test_the_fork_check_can_fail():
    assert FORK.search("    if config.base_bits is not None:") and FORK.search('if base.get("base_bits") is None:')
