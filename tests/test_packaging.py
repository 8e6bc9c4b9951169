"""The distribution: folders import as lumireg.<folder>, the client stays free of torch, one CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

# the console script installed beside this interpreter
LUMIREG = str(Path(sys.executable).parent / "lumireg")
FOLDERS = ["kernels", "network", "train", "evaluate", "export", "service", "client", "benchmarks"]


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_imports_as_lumireg_subpackage(folder, tmp_path):
    result = _python(f"import lumireg.{folder} as m; print(m.__file__)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"/{folder}/__init__.py" in result.stdout


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_bare_top_level_package_is_installed(folder, tmp_path):
    result = _python(f"import importlib.util; print(importlib.util.find_spec({folder!r}))", cwd=tmp_path)
    assert result.stdout.strip() == "None"


def test_client_and_cli_never_import_torch(tmp_path):
    code = (
        "import sys, lumireg.client, lumireg.cli, lumireg.client.command\n"
        "lumireg.cli.build_parser().parse_args(['register', 'f.nii.gz', 'm.nii.gz', '-o', 'out'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))"
    )
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_lists_every_subcommand(tmp_path):
    result = subprocess.run([LUMIREG, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "register", "train", "evaluate", "export", "bench"):
        assert command in result.stdout


def test_cli_bad_option_fails_clearly(tmp_path):
    result = subprocess.run(
        [LUMIREG, "bench", "service", "--batch-sizes", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "--batch-sizes needs positive integers" in result.stderr
