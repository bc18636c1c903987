"""The set-up: both pinned sets (constraints.txt, constraints-min.txt) against requirements.txt, and what reaches the
user at import."""
import importlib.metadata
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT


def read_lines(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


# Each of the project's virtual environments and the constraints file scripts/setup.sh installs it from.
PINNED_SETS = {".venv": "constraints.txt", ".venv-min": "constraints-min.txt"}


def pins(constraints="constraints.txt"):
    out = {}
    for line in read_lines(constraints):
        name, _, version = line.partition("==")
        assert version, f"{constraints}: {line!r} is not pinned with =="
        out[canonicalize_name(name)] = version
    return out


def requirements():
    return [Requirement(line) for line in read_lines("requirements.txt")]


@pytest.mark.parametrize("constraints", PINNED_SETS.values())
def test_every_requirement_is_pinned_inside_its_range(constraints):
    pinned = pins(constraints)
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"requirements.txt's {req.name} has no pin in {constraints}"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"{constraints} pins {req.name}=={pinned[name]}, outside requirements.txt's {req.specifier}"


def test_the_main_set_pins_the_torch_pair_on_disk():
    pinned = pins()
    assert pinned["torch"] == "2.14.1" and pinned["torchvision"] == "0.29.1"


# The direct requirements ColIntern calls into, whose lower bounds the floor set holds; the others (faiss, pillow,
# scipy, safetensors, plotting, test tools) sit at constraints.txt's pins there too.
AT_THEIR_FLOOR = ("torch", "torchvision", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "mteb")


def test_the_floor_set_pins_the_lower_bounds_requirements_claims():
    """constraints-min.txt is what requirements.txt claims at its oldest: each library ColIntern calls into is pinned
    at its lower bound, so the suite runs on the oldest release a user may have; transformers at 5.17 with the
    huggingface_hub and tokenizers of the GPU machines."""
    floor = pins("constraints-min.txt")
    claimed = {canonicalize_name(req.name): req for req in requirements()}
    for name in AT_THEIR_FLOOR:
        lower = [Version(s.version) for s in claimed[name].specifier if s.operator == ">="]
        assert len(lower) == 1, f"requirements.txt's {name} needs one lower bound (>=), has {claimed[name].specifier}"
        assert Version(floor[name]) == lower[0], \
            f"constraints-min.txt pins {name}=={floor[name]}, requirements.txt claims >={lower[0]}"
    assert (floor["transformers"], floor["huggingface-hub"], floor["tokenizers"]) == ("5.17.0", "1.33.0", "0.23.2")


def test_this_venv_holds_exactly_its_pinned_versions():
    """In a venv that scripts/setup.sh made (CI's .venv and .venv-min), every pinned package is installed at its
    pin. Elsewhere (a user's own environment with requirements.txt's ranges) there is nothing to hold to the pins."""
    venv = os.path.relpath(os.path.realpath(sys.prefix), os.path.realpath(ROOT))
    if venv not in PINNED_SETS:
        pytest.skip(f"not one of the project's venvs {sorted(PINNED_SETS)} ({sys.prefix}): the pins hold there only")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    wrong = {name: (version, installed.get(name)) for name, version in pins(PINNED_SETS[venv]).items()
             if installed.get(name, "").split("+")[0] != version}
    assert not wrong, f"installed versions differ from {PINNED_SETS[venv]} (pinned, installed): {wrong}"


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
