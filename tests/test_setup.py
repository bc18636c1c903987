"""The set-up: both pinned sets (constraints.txt, constraints-min.txt) against requirements.txt, which FAISS set-up
installs (scripts/faiss_choice.py), and what reaches the user at import."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def read_lines(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


# Each of the project's virtual environments and the constraints file scripts/setup.sh installs it from.
PINNED_SETS = {".venv": "constraints.txt", ".venv-min": "constraints-min.txt"}

_spec = importlib.util.spec_from_file_location("faiss_choice", os.path.join(ROOT, "scripts", "faiss_choice.py"))
faiss_choice = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faiss_choice)


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
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{constraints} pins {req.name}=={pinned[name]}, outside requirements.txt's {req.specifier}"
        )


def test_the_main_set_pins_the_torch_pair_on_disk():
    pinned = pins()
    assert pinned["torch"] == "2.14.1" and pinned["torchvision"] == "0.29.1"


# The direct requirements ColIntern calls into, whose lower bounds the floor set holds; the others (faiss, pillow,
# scipy, safetensors, plotting, test tools) sit at constraints.txt's pins there too.
AT_THEIR_FLOOR = (
    "torch",
    "torchvision",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "mteb",
    "sentence-transformers",
)


def test_the_floor_set_pins_the_lower_bounds_requirements_claims():
    """constraints-min.txt is what requirements.txt claims at its oldest: each library ColIntern calls into is pinned
    at its lower bound, so the suite runs on the oldest release a user may have; transformers at 5.17 with the
    huggingface_hub and tokenizers of the GPU machines."""
    floor = pins("constraints-min.txt")
    claimed = {canonicalize_name(req.name): req for req in requirements()}
    for name in AT_THEIR_FLOOR:
        lower = [Version(s.version) for s in claimed[name].specifier if s.operator == ">="]
        assert len(lower) == 1, f"requirements.txt's {name} needs one lower bound (>=), has {claimed[name].specifier}"
        assert Version(floor[name]) == lower[0], (
            f"constraints-min.txt pins {name}=={floor[name]}, requirements.txt claims >={lower[0]}"
        )
    assert (floor["transformers"], floor["huggingface-hub"], floor["tokenizers"]) == ("5.17.0", "1.33.0", "0.23.2")


def test_this_venv_holds_exactly_its_pinned_versions():
    """In a venv that scripts/setup.sh made (CI's .venv and .venv-min), every pinned package is installed at its
    pin (faiss-cpu where set-up installed it rather than a GPU FAISS, pinned in scripts/faiss_choice.py). Elsewhere
    (a user's own environment with requirements.txt's ranges) there is nothing to hold to the pins."""
    venv = os.path.relpath(os.path.realpath(sys.prefix), os.path.realpath(ROOT))
    if venv not in PINNED_SETS:
        pytest.skip(f"not one of the project's venvs {sorted(PINNED_SETS)} ({sys.prefix}): the pins hold there only")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    pinned = pins(PINNED_SETS[venv])
    if "faiss-cpu" not in installed and faiss_choice.installed_besides("faiss-cpu"):
        del pinned["faiss-cpu"]  # a machine with an NVIDIA GPU: set-up installed a GPU FAISS in its place
    wrong = {
        name: (version, installed.get(name))
        for name, version in pinned.items()
        if installed.get(name, "").split("+")[0] != version
    }
    assert not wrong, f"installed versions differ from {PINNED_SETS[venv]} (pinned, installed): {wrong}"


def test_bitsandbytes_optional_kernel_warning_is_dropped_and_others_kept():
    """bitsandbytes warns at import, on CPUs with AVX512-BF16, that the optional `kernels` package is missing. The
    record is emitted here through the same logger (this CPU may not have AVX512-BF16), after a real import."""
    code = (
        "import logging, colintern_model, bitsandbytes\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1', \"No module named 'kernels'\")\n"
        "log.warning('some other bitsandbytes warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kernels-community" not in result.stderr and "some other bitsandbytes warning" in result.stderr


# Which FAISS set-up installs (scripts/faiss_choice.py). `nvidia-smi` is faked by a script first (and alone) on PATH;
# torch's CUDA version is handed in. No machine here has an NVIDIA GPU: a GPU FAISS is never installed or run here.
FAKE_NVIDIA_SMI = {
    "lists a GPU": "echo 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)'",
    "fails": "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9",
    "lists none": "echo 'No devices were found'; exit 6",
    "absent": None,
}


def fake_nvidia_smi(tmp_path, kind):
    """A folder for PATH holding an `nvidia-smi` that behaves as `kind` says (none for 'absent')."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    if FAKE_NVIDIA_SMI[kind] is not None:
        script = folder / "nvidia-smi"
        script.write_text("#!/bin/sh\n" + FAKE_NVIDIA_SMI[kind] + "\n")
        script.chmod(0o755)
    return str(folder)


@pytest.mark.parametrize(
    "smi, cuda, expected",
    [
        ("lists a GPU", "13.0", "faiss-gpu-cuvs==1.15.1"),  # torch 2.11-2.14 from PyPI: CUDA 13.0
        ("lists a GPU", "12.8", "faiss-gpu==1.15.1"),
        ("lists a GPU", None, "faiss-cpu"),  # a CPU build of torch
        ("lists a GPU", "11.8", "faiss-cpu"),  # no GPU FAISS for that CUDA major
        ("fails", "13.0", "faiss-cpu"),
        ("lists none", "13.0", "faiss-cpu"),
        ("absent", "13.0", "faiss-cpu"),
    ],
)
def test_faiss_choice_follows_nvidia_smi_and_torch_cuda(tmp_path, monkeypatch, smi, cuda, expected):
    """A GPU FAISS of torch's CUDA major only where nvidia-smi lists a GPU and torch is a CUDA build; faiss-cpu
    otherwise, with the reason. (pip's check that it installs beside torch is stubbed here: it says yes.)"""
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, smi))
    checked = []
    requirement, why = faiss_choice.choose(cuda=lambda: cuda, installs=lambda req: checked.append(req) or (True, ""))
    assert requirement == expected, why
    assert checked == ([] if expected == "faiss-cpu" else [expected])
    if expected == "faiss-cpu":
        assert why.startswith("no NVIDIA GPU" if smi != "lists a GPU" else "1 NVIDIA GPU(s), but")


def test_faiss_choice_falls_back_to_cpu_when_the_gpu_faiss_does_not_install_beside_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "lists a GPU"))
    requirement, why = faiss_choice.choose(cuda=lambda: "13.0", installs=lambda req: (False, "the pip conflict"))
    assert requirement == "faiss-cpu"
    assert "faiss-gpu-cuvs==1.15.1 (CUDA 13) does not install beside torch" in why and why.endswith("the pip conflict")


@pytest.mark.parametrize(
    "setting, smi, cuda, expected",
    [
        ("cpu", "lists a GPU", "13.0", "faiss-cpu"),
        (
            "gpu",
            "absent",
            "12.6",
            "faiss-gpu==1.15.1",
        ),  # FAISS=gpu: no nvidia-smi asked (a machine that builds the venv)
        ("gpu", "absent", None, "faiss-cpu"),  # ... and the CLI stops there (test_faiss_choice_cli)
        ("faiss-gpu-cu12==1.14.1.post1", "absent", None, "faiss-gpu-cu12==1.14.1.post1"),  # as given, unchecked
    ],
)
def test_faiss_choice_overrides(tmp_path, monkeypatch, setting, smi, cuda, expected):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, smi))
    requirement, why = faiss_choice.choose(setting, cuda=lambda: cuda, installs=lambda req: (True, ""))
    assert requirement == expected, why


@pytest.mark.parametrize(
    "env, smi, expected, message",
    [
        ({}, "absent", "faiss-cpu", "FAISS: faiss-cpu (no NVIDIA GPU: `nvidia-smi -L` lists none)"),
        ({}, "lists a GPU", "faiss-cpu", "FAISS: faiss-cpu (1 NVIDIA GPU(s), but torch"),
        ({"FAISS": "cpu"}, "lists a GPU", "faiss-cpu", "FAISS: faiss-cpu (FAISS=cpu)"),
        ({"FAISS": "gpu"}, "lists a GPU", None, "FAISS: no GPU FAISS to install (FAISS=gpu, but torch"),
    ],
    ids=["no nvidia-smi", "a GPU, CPU torch", "FAISS=cpu", "FAISS=gpu, CPU torch"],
)
def test_faiss_choice_cli(tmp_path, env, smi, expected, message):
    """What scripts/setup.sh runs: the requirement alone on stdout, one line why on stderr; FAISS=gpu with no GPU
    FAISS to install fails set-up. torch here is handed in as a CPU build (--torch-cuda none), so pip is not asked."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "faiss_choice.py"), "--torch-cuda", "none"],
        env={**os.environ, **env, "PATH": fake_nvidia_smi(tmp_path, smi)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == (0 if expected else 1), result.stderr
    assert result.stdout == (f"{expected}\n" if expected else "")
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


# pip's words when it cannot reach the package index: the tests that ask PyPI skip then.
UNREACHABLE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Max retries exceeded",
    "ProxyError",
    "Could not fetch URL",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Temporary failure in name resolution",
)


def pip_dry_run(*args):
    """`pip install --dry-run ARGS` in this interpreter; skips the test where pip cannot reach the package index."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--disable-pip-version-check",
            "--retries",
            "1",
            "--timeout",
            "20",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = [
        line.strip()
        for line in (result.stderr + result.stdout).splitlines()
        if any(word in line for word in UNREACHABLE)
    ]
    if result.returncode != 0 and said:
        pytest.skip(f"pip cannot reach the package index: {said[0][:300]}")
    return result


LINUX_X86_64 = [
    f"--platform={tag}_x86_64" for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014")
]


@pytest.mark.parametrize("major", sorted(faiss_choice.GPU_FAISS))
def test_each_gpu_faiss_is_a_wheel_on_pypi_for_its_cuda_major(tmp_path, major):
    """GPU_FAISS[major] resolves, from PyPI, to a Linux x86_64 wheel for our Python that needs the CUDA runtime of
    that major, and accepts the numpy that both pinned sets hold."""
    requirement = faiss_choice.GPU_FAISS[major]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    result = pip_dry_run(
        "--ignore-installed",
        "--no-deps",
        "--only-binary=:all:",
        *LINUX_X86_64,
        f"--python-version={python}",
        f"--target={tmp_path / 'target'}",
        "--quiet",
        "--report",
        "-",
        requirement,
    )
    assert result.returncode == 0, result.stderr
    [item] = json.loads(result.stdout)["install"]
    wheel, metadata = item["download_info"]["url"].rsplit("/", 1)[-1], item["metadata"]
    assert f"{canonicalize_name(metadata['name'])}=={metadata['version']}" == requirement
    assert wheel.endswith(".whl") and "x86_64" in wheel, wheel
    needs = [Requirement(line) for line in metadata["requires_dist"]]
    runtime = [req for req in needs if not req.marker and canonicalize_name(req.name).startswith("nvidia-cuda-runtime")]
    assert runtime, f"{requirement} names no CUDA runtime: {metadata['requires_dist']}"
    for req in runtime:
        name, spec = canonicalize_name(req.name), req.specifier
        assert name == f"nvidia-cuda-runtime-cu{major}" or (
            name == "nvidia-cuda-runtime"
            and spec.contains(f"{major}.99")
            and not spec.contains(f"{major + 1}.0")
            and not spec.contains(f"{major - 1}.99")
        ), f"{requirement} needs {req}, not CUDA {major}"
    [numpy] = [req for req in needs if canonicalize_name(req.name) == "numpy" and not req.marker]
    for constraints in PINNED_SETS.values():
        assert numpy.specifier.contains(pins(constraints)["numpy"]), f"{requirement}: {numpy}, {constraints}"


def test_no_gpu_faiss_installs_beside_the_pinned_cuda_13_torch():
    """The README says so: torch 2.11-2.14 from PyPI pin CUDA 13.0, and CUDA 13's GPU FAISS (faiss-gpu-cuvs 1.15.1)
    needs CUDA runtime >= 13.2, so set-up keeps faiss-cpu on a machine with a GPU too. This asks pip (a dry run into
    this venv, at its pins); once it installs, the README and this test change."""
    cuda = faiss_choice.torch_cuda()
    if not cuda or not cuda.startswith("13."):
        pytest.skip(f"torch here is not a CUDA 13 build ({cuda})")
    venv = os.path.relpath(os.path.realpath(sys.prefix), os.path.realpath(ROOT))
    constraints = os.path.join(ROOT, PINNED_SETS.get(venv, "constraints.txt"))
    pip_dry_run("--ignore-installed", "--no-deps", "--quiet", faiss_choice.GPU_FAISS[13])  # skips if PyPI is away
    ok, why = faiss_choice.installs_beside_torch(faiss_choice.GPU_FAISS[13], constraints)
    assert not ok
    assert "faiss-gpu-cuvs 1.15.1 depends on nvidia-cuda-runtime<14 and >=13.2" in why, why
