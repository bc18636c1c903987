"""Shared fixtures: a tiny random InternVL saved with save_pretrained, and keyword pages (keyword_pages.py)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

import make_tiny_model  # noqa: E402
from keyword_pages import render_keyword_page  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs scripts in several processes (20 s or more on 2 cores); "
                                       "`-m 'not slow'` leaves them out for a quick run")


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
