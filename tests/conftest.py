"""Shared fixtures: a tiny random InternVL saved with save_pretrained, and keyword pages
(make_synthetic_data.render_keyword_page)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

import make_tiny_model  # noqa: E402
from make_synthetic_data import render_keyword_page  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: runs scripts in several processes (20 s or more on 2 cores); "
        "`-m 'not slow'` leaves them out for a quick run",
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny InternVL (tile 224, 64 image tokens per tile) in a save_pretrained folder."""
    out = tmp_path_factory.mktemp("tiny-internvl")
    model, processor = make_tiny_model.build("tiny", tile=224, seed=0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def query(word: str) -> str:
    """The keyword tests' query for `word`."""
    return f"Which page is about {word}?"


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that train or mine with the tiny model (`pytestmark = pytest.mark.usefixtures(...)`): its matmuls
    are too small to gain from a second thread, and a DataLoader worker needs the other core; two spinning OpenMP
    threads on a busy 2-core machine made steps up to 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def keyword_page():
    return render_keyword_page


# -----------------------------------------------------------------------------
# Running a script in several processes, as users do


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun_flags(nproc: int = 1, nnodes: int = 1) -> list:
    """torch.distributed.run's flags: one node of nproc processes (--standalone), or one of nnodes agents of nproc
    processes each meeting at a c10d rendezvous on localhost (the README's multi-node command, with localhost for the
    first node's address); [] for one plain process."""
    if nnodes == 1:
        return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        str(nproc),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"localhost:{free_port()}",
        "--rdzv_id",
        "colintern-test",
    ]


def launch(script_and_flags: list, nproc: int = 1, nnodes: int = 1, env=None, timeout: float = 400):
    """Run `python [torchrun flags] SCRIPT FLAGS...` as one process, one torchrun node or nnodes torchrun agents on
    this machine (started together, as on nnodes machines) -> subprocess.CompletedProcess: the first non-zero exit
    code (else 0), and every agent's stdout and stderr, one after the other."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, *torchrun_flags(nproc, nnodes), *map(str, script_and_flags)]
    agents = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(nnodes)
    ]
    try:
        outputs = [agent.communicate(timeout=timeout) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    code = next((agent.returncode for agent in agents if agent.returncode), 0)
    return subprocess.CompletedProcess(command, code, "".join(o for o, _ in outputs), "".join(e for _, e in outputs))
