"""The package's shape: which part may import which, read from the source with ``ast``.

Every ``import`` counts, at module level or inside a function, and so does
``importlib.import_module("lumireg....")`` with a literal name. A part is a
folder (``kernels``, ``service``, ...) or a top-level module (``contract``,
``cli``, ``__main__``; ``__init__`` is the package itself, which holds only
``__version__``). ``tests/`` is not part of the package and may import all.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGE = {"tests", "build", "dist", "runs", "deploy"}  # folders of the repository that hold no package code

# What each part may import (besides itself, the standard library and third-party packages).
# DESIGN.md's house table, plus the edges the code needs, each said why.
EVERYTHING = {
    "__init__",
    "contract",
    "kernels",
    "network",
    "train",
    "evaluate",
    "export",
    "service",
    "model_repository",
    "client",
    "pacs",
    "benchmarks",
    "cli",
}
ALLOWED = {
    "__init__": set(),  # the package: __version__, and nothing imported
    "contract": set(),  # the shared facts: standard library only (no torch, no numpy at import)
    "kernels": {"contract"},
    "network": {"kernels", "contract"},
    "evaluate": {
        "kernels",  # DESIGN.md: optional, GPU metrics
        "contract",
        "__init__",  # __version__ names the evaluator in the report
    },
    "train": {"network", "kernels", "contract"},
    "export": {
        "network",
        "kernels",  # below network: what the exported graph is made of
        "contract",
    },
    "service": {
        "export",  # the ONNX runner and the network's graph for the PyTorch path; `serve` exports on first use
        "network",  # velocity -> displacement, the checkpoint for the PyTorch path
        "kernels",
        "evaluate",  # the QC report's NDV and Jacobian are the evaluator's, one definition of LUMIR's metrics
        "contract",
        "__init__",  # __version__ in the QC report
    },
    "model_repository": {"service", "kernels", "contract"},  # the python-backend entry files import service
    "client": {
        "contract",
        "__init__",  # __version__ in the Series Description and Software Versions of DICOM results
    },  # a PACS host has no torch: nothing else of lumireg
    "pacs": {"client", "contract"},  # the PACS node registers through the client, on a host without torch
    "benchmarks": EVERYTHING,
    "cli": EVERYTHING,
    "__main__": {"cli"},
}


def package_files() -> dict[Path, str]:
    """Every ``.py`` file of the package, mapped to its part."""
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        top = relative.parts[0]
        if top.startswith(".") or top in NOT_PACKAGE or top.endswith(".egg-info"):
            continue
        files[path] = relative.stem if len(relative.parts) == 1 else top
    return files


def _part(module: str, names=()) -> list[str]:
    """The parts a ``lumireg...`` module name (and, for ``from lumireg import x``, the names) stand for."""
    parts = module.split(".")
    if parts[0] != "lumireg":
        return []
    if len(parts) > 1:
        return [parts[1]]
    return [name if name in ALLOWED else "__init__" for name in names] or ["__init__"]


def imports(path: Path, root: Path = ROOT):
    """``(line, import statement, part)`` for every import of lumireg in ``path`` (a file under ``root``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["lumireg", *path.relative_to(root).parent.parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                for part in _part(alias.name):
                    yield node.lineno, f"import {alias.name}", part
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against this file's package
                module = ".".join(package[: len(package) - node.level + 1] + ([module] if module else []))
            names = [alias.name for alias in node.names]
            for part in _part(module, names):
                yield node.lineno, f"from {module} import {', '.join(names)}", part
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            for part in _part(node.args[0].value):
                yield node.lineno, f"import_module({node.args[0].value!r})", part


def forbidden_edges(files: dict[Path, str], root: Path = ROOT) -> list[str]:
    """``"file:line: source -> target (statement); ..."`` for every import that ``ALLOWED`` does not allow."""
    errors = []
    for path, source in files.items():
        for line, statement, target in imports(path, root):
            if target != source and target not in ALLOWED[source]:
                errors.append(
                    f"{path.relative_to(root)}:{line}: {source} -> {target} ({statement}); "
                    f"{source} may import only {sorted(ALLOWED[source])}"
                )
    return errors


def test_every_package_file_belongs_to_a_part_with_rules():
    unknown = {str(p.relative_to(ROOT)): part for p, part in package_files().items() if part not in ALLOWED}
    assert not unknown, f"add these parts to ALLOWED in {Path(__file__).name}: {unknown}"


def test_the_walk_sees_function_level_imports():
    seen = {(path.relative_to(ROOT).as_posix(), target) for path in package_files() for _, _, target in imports(path)}
    assert ("cli.py", "train") in seen  # `lumireg train` imports the loop inside a function
    assert ("client/command.py", "contract") in seen  # the LUMIR names, imported inside a function


def test_no_part_imports_what_its_row_does_not_allow():
    errors = forbidden_edges(package_files())
    assert not errors, "forbidden imports:\n" + "\n".join(errors)


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_contract_imports_neither_torch_nor_numpy(tmp_path):
    code = "import sys, lumireg.contract\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy'}))"
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(module: str) -> set[str]:
    """Every lumireg module ``module`` can reach by imports, at module level or inside functions."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("lumireg")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lumireg"):
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]  # submodules; other names resolve to nothing
    return seen


def test_serve_never_reaches_training_code(tmp_path):
    reached = import_closure("lumireg.service.runner")
    assert "lumireg.export.onnx" in reached  # serve exports on first use: the parity check is on the path
    assert not {m for m in reached if m.startswith("lumireg.train")}, sorted(reached)
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(reached)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('lumireg.train')))"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "statement,edge",
    [
        ("from lumireg.service import server", "export -> service"),
        ("import lumireg.train.synthetic", "export -> train"),
        ("from ..benchmarks import machine", "export -> benchmarks"),
        ("from lumireg import client", "export -> client"),
        ("importlib.import_module('lumireg.service.runner')", "export -> service"),
    ],
)
def test_a_forbidden_edge_is_named_with_file_and_line(tmp_path, statement, edge):
    (tmp_path / "export").mkdir()
    source = tmp_path / "export" / "extra.py"
    source.write_text(f"import importlib\nfrom lumireg.contract import CANVAS\n\n\ndef late():\n    {statement}\n")
    errors = forbidden_edges({source: "export"}, root=tmp_path)
    assert len(errors) == 1 and errors[0].startswith(f"export/extra.py:6: {edge} ("), errors
