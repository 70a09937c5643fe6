"""The install: a torch and a torchvision that do not work together stop every script in one line.

PyPI's torchvision beside a CPU build of torch from another index, or beside a torch of another release, fails at
import with "operator torchvision::nms does not exist" (torch 2.13.0+cpu with torchvision 0.28.0 did, by hand). A
torchvision that fails so on import stands in for it here, in a fresh Python as a user starts detect.py.
"""
import subprocess
import sys
from importlib import metadata

import torch

from conftest import REPO, child_env


def test_a_torchvision_that_does_not_fit_torch_is_one_line_naming_both_and_the_fix(tmp_path):
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    result = subprocess.run([sys.executable, str(REPO / "detect.py"), "img"], cwd=REPO, capture_output=True, text=True,
                            env={**child_env(), "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line, = result.stderr.splitlines()
    version = metadata.version("torchvision")  # the one installed: its metadata names the torch it needs
    assert line.startswith(f"error: torch {torch.__version__} and torchvision {version} (which needs torch "), line
    assert "do not work together (operator torchvision::nms does not exist)" in line, line
    needs = line.split("which needs torch ")[1].split(")")[0]
    assert line.endswith(f"; install a matching pair: pip install --force-reinstall torch=={needs} "
                         f"torchvision=={version}"), line
