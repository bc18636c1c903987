"""Mining (and evaluation) under torchrun: 2 gloo processes on the CPU against one process, byte for byte; a resumed
run with another number of processes; one rank's error stopping both. The runs go through MINE_HARNESS (as
test_train.py's RECORD_GRADIENTS): small query blocks so that the ranks really split the queries, and an injected
failure on one rank."""

import json
import os
import re
import shutil
import time

import pytest
import test_mine
import torch
from conftest import ROOT, launch

ckpt, hub = test_mine.ckpt, test_mine.hub  # module fixtures: the checkpoint and the hub-layout pages

# 24 query tokens a block: the tiny model's queries are ~10 tokens, so the 22 queries make ~10 blocks and each
# rank searches several; --query_batch 4 gives 6 batches, 3 per rank.
MINE_HARNESS = """
import os, sys
sys.path.insert(0, {root!r})
import mine_hard_negatives as mine
from colintern_cli import run_cli
mine.QUERY_BLOCK_TOKENS = 24
if os.environ.get("COLINTERN_TEST_FAIL_RANK") == os.environ.get("RANK", "0"):
    def failing_encode_shard(*a, **k):
        raise RuntimeError("injected failure while encoding a shard")
    mine.encode_shard = failing_encode_shard
run_cli(mine.main, mine.parse_args(sys.argv[1:]))
"""


def run_mine(tmp, flags, nproc, fail_rank=None, timeout=300, nnodes=1):
    script = os.path.join(tmp, "mine_harness.py")
    with open(script, "w") as f:
        f.write(MINE_HARNESS.format(root=ROOT))
    env = {} if fail_rank is None else {"COLINTERN_TEST_FAIL_RANK": str(fail_rank)}
    return launch([script, *flags], nproc=nproc, nnodes=nnodes, env=env, timeout=timeout)


def mine_flags(ckpt, hub, out, cache):
    return [
        "--ckpt",
        ckpt,
        "--hub_name",
        hub["dir"],
        "--split",
        "train",
        "--out_jsonl",
        out,
        "--cache_dir",
        cache,
        "--shard_pages",
        5,
        "--num_workers",
        0,
        "--doc_batch",
        4,
        "--query_batch",
        4,
        "--score_dtype",
        "fp32",
        "--k",
        4,
        "--margin",
        0.99,
    ]


def read_stats(out):
    with open(os.path.splitext(out)[0] + ".stats.json") as f:
        stats = json.load(f)
    for key in ("timings_s", "processes", "out_jsonl"):
        stats.pop(key)
    return stats


@pytest.fixture(scope="module")
def one_process(ckpt, hub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mine1")
    result = run_mine(tmp, mine_flags(ckpt, hub, tmp / "one.jsonl", tmp / "cache"), nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_two_processes_mine_the_same_bytes_and_resume_from_one_process_shards(ckpt, hub, one_process, tmp_path):
    """2 gloo processes, fresh cache: each encodes 2 of the 4 shards and searches its query blocks; rank 0 writes a
    JSONL byte-identical to one process's and the same stats. Then 2 nodes (two torchrun agents of one process each,
    c10d rendezvous on localhost) over the 1-process cache with two shards deleted encode exactly those two and again
    write the same bytes."""
    one = one_process / "one.jsonl"
    result = run_mine(tmp_path, mine_flags(ckpt, hub, tmp_path / "two.jsonl", tmp_path / "cache"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == one.read_bytes()
    stats_one, stats_two = read_stats(one), read_stats(tmp_path / "two.jsonl")
    assert stats_two["cache"]["encoded"] == 4 and stats_one["cache"]["encoded"] == 4
    stats_one["cache"].pop("dir"), stats_two["cache"].pop("dir")
    assert stats_two == stats_one
    folder = json.load(open(os.path.splitext(tmp_path / "two.jsonl")[0] + ".stats.json"))["cache"]["dir"]
    for s in range(4):  # the shards themselves are the same bytes' worth: same embeddings, whichever rank
        a = torch.load(os.path.join(folder, f"shard_{s:05d}.pt"))
        b = torch.load(
            os.path.join(folder.replace(str(tmp_path / "cache"), str(one_process / "cache")), f"shard_{s:05d}.pt")
        )
        assert torch.equal(a["embeddings"], b["embeddings"]) and a["hashes"] == b["hashes"]
    assert sorted(json.load(open(os.path.join(folder, "manifest.json")))["shards"]) == ["0", "1", "2", "3"]
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]

    resumed = tmp_path / "resumed_cache"
    shutil.copytree(one_process / "cache", resumed)
    one_folder = os.path.join(resumed, os.path.basename(folder))
    for s in (1, 2):
        os.remove(os.path.join(one_folder, f"shard_{s:05d}.pt"))
    result = run_mine(tmp_path, mine_flags(ckpt, hub, tmp_path / "resumed.jsonl", resumed), nproc=1, nnodes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reusing 2 of 4 shard(s)" in result.stdout
    assert (tmp_path / "resumed.jsonl").read_bytes() == one.read_bytes()
    assert read_stats(tmp_path / "resumed.jsonl")["cache"]["encoded"] == 2


@pytest.mark.slow
def test_one_rank_failing_stops_both_with_its_error(ckpt, hub, tmp_path):
    """Rank 1 raises while encoding its shard: both processes exit promptly (no wait in a collective), rank 0 with
    one line naming rank 1 and its error, and no output is written."""
    start = time.perf_counter()
    result = run_mine(
        tmp_path, mine_flags(ckpt, hub, tmp_path / "out.jsonl", tmp_path / "cache"), nproc=2, fail_rank=1, timeout=240
    )
    assert result.returncode != 0
    assert "error: rank 1 of 2 failed while encoding pages: RuntimeError: injected failure" in result.stderr
    # rank 1's traceback (a bug keeps it; torch may prefix each line of it with the rank)
    assert re.search(r"^(\[rank1\]: )?RuntimeError: injected failure while encoding a shard$", result.stderr, re.M)
    assert "hash pages" in result.stderr and result.stderr.count("hash pages: 100%") == 1  # rank 0's bar alone
    assert not os.path.exists(tmp_path / "out.jsonl")
    print(f"failed run took {time.perf_counter() - start:.1f} s")


# -----------------------------------------------------------------------------
# eval.py


def run_eval_processes(tmp, flags, nproc, timeout=400, nnodes=1):
    out = os.path.join(tmp, "out.json")
    result = launch(
        [
            os.path.join(ROOT, "eval.py"),
            *flags,
            "--device",
            "cpu",
            "--batch_size",
            "3",
            "--results_dir",
            os.path.join(tmp, "cache"),
            "--out_json",
            out,
        ],
        nproc=nproc,
        nnodes=nnodes,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        summary = json.load(f)
    summary["page_index"].pop("timings_s")  # seconds: the one part of the summary that differs between runs
    return summary


@pytest.mark.slow
def test_two_processes_evaluate_the_same_numbers(tiny_model_dir, tmp_path):
    """A local task (10 pages of two shapes, 8 queries; batches of 3, so each rank encodes its own batches) with 2
    gloo processes on one node, and on 2 nodes (two torchrun agents, c10d rendezvous on localhost): the summary and
    the predictions equal one process's; only rank 0 wrote. Pooled, with rerank: the
    ranks split the encoding and gather it as unpooled runs do, then each pools the gathered pages and keeps their full
    vectors (an unpooled run is the same path with pooling the identity; one run pair keeps the suite short)."""
    pooling = ["--pool_factor", 2, "--rerank", 3]
    from test_eval import KEYWORDS, QRELS, write_hub_layout

    from make_synthetic_data import render_keyword_page

    pages = [
        render_keyword_page(w, size=(224, 224) if i % 2 else (448, 224), variant=i) for i, w in enumerate(KEYWORDS)
    ]
    folder = write_hub_layout(tmp_path / "task", pages, [f"Which page is about {w}?" for w in KEYWORDS[:8]], QRELS)
    flags = ["--model_id", tiny_model_dir, "--local_task", folder, *pooling]
    one = run_eval_processes(tmp_path / "one", flags, nproc=1)
    two = run_eval_processes(tmp_path / "two", flags, nproc=2)
    nodes = run_eval_processes(tmp_path / "nodes", flags, nproc=1, nnodes=2)
    assert two == one and nodes == one
    assert one["page_index"]["pool_factor"] == 2 and one["page_index"]["pages"] == 10
    runs = ("one", "two", "nodes")
    predictions = [
        sorted(
            os.path.relpath(os.path.join(d, f), tmp_path / run)
            for d, _, fs in os.walk(tmp_path / run / "out_predictions")
            for f in fs
        )
        for run in runs
    ]
    assert predictions[0] == predictions[1] == predictions[2] and predictions[0]
    for name in predictions[0]:
        assert (
            (tmp_path / "one" / name).read_bytes()
            == (tmp_path / "two" / name).read_bytes()
            == (tmp_path / "nodes" / name).read_bytes()
        )
