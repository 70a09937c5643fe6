"""The install: a torch and a torchvision that do not work together stop every script in one line.

PyPI's torchvision beside a CPU build of torch from another index, or beside a torch of another release, fails at
import with "operator torchvision::nms does not exist" (torch 2.13.0+cpu with torchvision 0.28.0 did, by hand). A
torchvision that fails so on import stands in for it here, in a fresh Python as a user starts each script.

misc.run_cli checks the pair before a script parses its flags (misc.check_torch_pair); for that to come first,
whatever the order of the imports (an isort run), no module of the project imports torchvision at its top.
"""
import ast
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from conftest import REPO, child_env

# a command line of each script: the check comes before the flags are parsed, so they need not be valid here
SCRIPTS = {"create_data_lists.py": ["--data-folder", "data/BCCD"], "train.py": ["--epochs", "1"],
           "eval.py": ["--device", "cpu"], "detect.py": ["img"], "export.py": ["--format", "onnx"],
           "bench.py": ["--only", "parts"], "plots.py": ["--output", "curves.png"],
           "set_thresholds.py": ["--checkpoint", "runs/mine/checkpoint.pt", "--data-folder", "data/mine"]}


def project_modules():
    return sorted(p.name for p in REPO.glob("*.py"))


def test_every_script_is_checked():
    scripts = [name for name in project_modules() if 'if __name__ == "__main__":' in (REPO / name).read_text()]
    assert sorted(SCRIPTS) == scripts


def imports_at_import_time(tree):
    """The modules an `import` or `from ... import` among the statements run on import names (not inside functions)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
        yield from imports_at_import_time(node)


@pytest.mark.parametrize("module", project_modules())
def test_no_module_imports_torchvision_on_import(module):
    """Inside functions only: else importing the module, before run_cli, would fail with a traceback."""
    tree = ast.parse((REPO / module).read_text(), module)
    assert not [name for name in imports_at_import_time(tree) if name.split(".")[0] == "torchvision"]


def test_imports_inside_functions_are_seen():
    tree = ast.parse("import os\ntry:\n    from torchvision.ops import nms\nexcept ImportError:\n    pass\n"
                     "class A:\n    import torchvision\ndef f():\n    import torchvision.ops\n")
    assert list(imports_at_import_time(tree)) == ["os", "torchvision.ops", "torchvision"]


@pytest.fixture(scope="module")
def mismatched_torchvision(tmp_path_factory):
    """A folder to put first on PYTHONPATH: its torchvision fails on import as a mismatched one does."""
    folder = tmp_path_factory.mktemp("mismatch")
    (folder / "torchvision").mkdir()
    (folder / "torchvision" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    return folder


@pytest.fixture(scope="module")
def mismatched_runs(mismatched_torchvision):
    """run(script, help) -> the CompletedProcess of `python script` (its flags, or --help) with that torchvision. The
    first call starts every script so at once, each in a fresh Python (on 2 cores, half the time of one by one)."""
    started = {}

    def run(script, help):
        if (script, help) not in started:
            for name in sorted(SCRIPTS):
                argv = [sys.executable, str(REPO / name), *(["--help"] if help else SCRIPTS[name])]
                env = {**child_env(), "PYTHONPATH": str(mismatched_torchvision)}
                started[name, help] = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                       text=True, env=env)
        process = started[script, help]
        stdout, stderr = process.communicate(timeout=120)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    yield run
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("help", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["flags", "help"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_torchvision_that_does_not_fit_torch_is_one_line_naming_both_and_the_fix(script, help, mismatched_runs):
    result = mismatched_runs(script, help)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout  # not even --help's usage
    line, = result.stderr.splitlines()
    version = metadata.version("torchvision")  # the one installed: its metadata names the torch it needs
    assert line.startswith(f"error: torch {torch.__version__} and torchvision {version} (which needs torch "), line
    assert "do not work together (operator torchvision::nms does not exist)" in line, line
    needs = line.split("which needs torch ")[1].split(")")[0]
    assert line.endswith(f"; install a matching pair: pip install --force-reinstall torch=={needs} "
                         f"torchvision=={version}"), line
