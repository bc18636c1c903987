"""Which FAISS scripts/setup.sh installs: prints one pip requirement on stdout, and on stderr one line saying why.

Where `nvidia-smi -L` lists an NVIDIA GPU and torch is a CUDA build, the GPU FAISS of torch's CUDA major (GPU_FAISS),
if pip can install it beside the installed torch: one CUDA runtime (libcudart, libcublas) for both. Otherwise
faiss-cpu, as on every CPU machine. All of them install the same `faiss` module.

    FAISS=auto   the above (the default)
    FAISS=cpu    faiss-cpu
    FAISS=gpu    the GPU FAISS of torch's CUDA even where nvidia-smi lists no GPU; an error if none installs beside
                 torch
    FAISS=REQ    a pip requirement of your own, installed as given (e.g. FAISS=faiss-gpu==1.15.1)

    python scripts/faiss_choice.py [--constraints constraints.txt] [--torch-cuda 13.0|none]
    python scripts/faiss_choice.py --installed-besides REQ   (the installed FAISS builds other than REQ's, to remove)
"""

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys

CPU = "faiss-cpu"

# The GPU FAISS wheel on PyPI for each CUDA major. Both are Linux x86_64 only (no aarch64 GPU FAISS on PyPI), abi3.
#   12: faiss-gpu 1.15.1 (facebookresearch; cp310-abi3, manylinux_2_28): nvidia-cuda-runtime-cu12, nvidia-cublas-cu12
#       >=12.6,<13, nvidia-curand-cu12; numpy>=1.25. Fits a torch built for CUDA 12.6 or newer 12.x.
#   13: faiss-gpu-cuvs 1.15.1 (facebookresearch, with cuVS; cp311-abi3, manylinux_2_28): nvidia-cuda-runtime,
#       nvidia-cublas, nvidia-nvjitlink >=13.2,<14, libcuvs-cu13 26.06.*; numpy>=1.25. torch 2.11-2.14 from PyPI pin
#       CUDA 13.0 (cuda-toolkit 13.0.x: nvidia-cuda-runtime 13.0.96, nvidia-cublas 13.1.x), so pip cannot install it
#       beside them and set-up falls back to faiss-cpu, saying so (installs_beside_torch).
# Others on PyPI, not used: faiss-gpu-cu12 / faiss-gpu-cu11 1.14.1.post1 (third-party builds, CUDA 12 / 11),
# faiss-cuda 1.14.3.post0 (CUDA 12.8), faiss-gpu-cu12-cuvs and faiss-gpu-cu13-cuvs 1.15.0 (Python 3.12 only).
GPU_FAISS = {12: "faiss-gpu==1.15.1", 13: "faiss-gpu-cuvs==1.15.1"}


def nvidia_gpus():
    """The GPUs that `nvidia-smi -L` lists: none where it is missing, fails or hangs."""
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in result.stdout.splitlines() if line.startswith("GPU ")] if result.returncode == 0 else []


def torch_cuda():
    """The CUDA version the installed torch was built for (torch.version.cuda), None for a CPU build."""
    import torch

    return torch.version.cuda


def torch_version():
    return importlib.metadata.version("torch")


def installs_beside_torch(requirement, constraints=None):
    """(True, '') if pip can install `requirement` into this environment beside the installed torch (and under the
    constraints), else (False, pip's reason in one line). A dry run: pip reads the wheels' metadata only."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--disable-pip-version-check",
        f"torch=={torch_version()}",
        requirement,
    ] + (["-c", constraints] if constraints else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        return True, ""
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    why = (
        [line for line in lines if " depends on " in line or line.startswith("The user requested")]
        or [line for line in lines if line.startswith("ERROR:")]
        or lines[-1:]
    )
    return False, "; ".join(why)


def choose(setting="auto", gpus=nvidia_gpus, cuda=torch_cuda, installs=installs_beside_torch):
    """(the pip requirement to install, why)."""
    if setting == "cpu":
        return CPU, "FAISS=cpu"
    if setting not in ("auto", "gpu"):
        return setting, f"FAISS={setting}"
    where = "FAISS=gpu"
    if setting == "auto":
        found = gpus()
        if not found:
            return CPU, "no NVIDIA GPU: `nvidia-smi -L` lists none"
        where = f"{len(found)} NVIDIA GPU(s)"
    version = cuda()
    if not version:
        return CPU, f"{where}, but torch {torch_version()} is a CPU build"
    major = int(version.split(".")[0])
    if major not in GPU_FAISS:
        return (
            CPU,
            f"{where}, but no GPU FAISS for torch's CUDA {version} (scripts/faiss_choice.py knows CUDA "
            f"{', '.join(map(str, sorted(GPU_FAISS)))})",
        )
    ok, why = installs(GPU_FAISS[major])
    if not ok:
        return (
            CPU,
            f"{where}, but {GPU_FAISS[major]} (CUDA {major}) does not install beside torch "
            f"{torch_version()} (CUDA {version}): {why}",
        )
    return GPU_FAISS[major], f"{where}, torch's CUDA {version}"


def canonical(requirement):
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", name.group(1)).lower() if name else requirement


def installed_besides(requirement):
    """The installed distributions that provide the `faiss` module, other than `requirement`'s."""
    names = importlib.metadata.packages_distributions().get("faiss", [])
    return sorted({canonical(name) for name in names} - {canonical(requirement)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--constraints", help="the constraints file pip installs under (the GPU FAISS's check)")
    parser.add_argument("--torch-cuda", help="torch's CUDA version ('none': a CPU build); default: torch.version.cuda")
    parser.add_argument("--installed-besides", metavar="REQ", help="print the installed FAISS builds other than REQ's")
    args = parser.parse_args(argv)
    if args.installed_besides:
        print(" ".join(installed_besides(args.installed_besides)))
        return 0
    setting = os.environ.get("FAISS", "").strip() or "auto"
    cuda = (
        torch_cuda
        if args.torch_cuda is None
        else (lambda: None if args.torch_cuda.lower() in ("", "none") else args.torch_cuda)
    )
    requirement, why = choose(setting, cuda=cuda, installs=lambda req: installs_beside_torch(req, args.constraints))
    if setting == "gpu" and requirement == CPU:
        print(f"FAISS: no GPU FAISS to install ({why})", file=sys.stderr)
        return 1
    print(f"FAISS: {requirement} ({why})", file=sys.stderr)
    print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
