"""The set-up: pinned versions (constraints.txt) against requirements.txt, and what reaches the user at import."""
import importlib.metadata
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT


def read_lines(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def pins():
    out = {}
    for line in read_lines("constraints.txt"):
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not pinned with =="
        out[canonicalize_name(name)] = version
    return out


def test_every_requirement_is_pinned_inside_its_range():
    pinned = pins()
    for line in read_lines("requirements.txt"):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pinned, f"requirements.txt's {req.name} has no pin in constraints.txt (run `make pins`)"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside requirements.txt's {req.specifier}"
    assert pinned["torch"] == "2.14.1" and pinned["torchvision"] == "0.29.1"  # the pair scripts/setup.sh installs


def test_the_project_venv_holds_exactly_the_pinned_versions():
    """In the .venv that scripts/setup.sh made (CI's), every pinned package is installed at its pin. Elsewhere
    (a user's own environment with requirements.txt's ranges) there is nothing to hold to the pins."""
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        pytest.skip(f"not the project's .venv ({sys.prefix}): the pins hold there only")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    wrong = {name: (version, installed.get(name)) for name, version in pins().items()
             if installed.get(name, "").split("+")[0] != version}
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}"


def test_bitsandbytes_optional_kernel_warning_is_dropped_and_others_kept():
    """bitsandbytes warns at import, on CPUs with AVX512-BF16, that the optional `kernels` package is missing. The
    record is emitted here through the same logger (this CPU may not have AVX512-BF16), after a real import."""
    code = (
        "import logging, colintern_model, bitsandbytes\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1', \"No module named 'kernels'\")\n"
        "log.warning('some other bitsandbytes warning')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kernels-community" not in result.stderr and "some other bitsandbytes warning" in result.stderr
