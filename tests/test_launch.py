"""The launch layer (colintern_launch): each rank's device for every spelling, the one timeout, the model flags mine
and eval share, failure agreement and rank-0 printing in real gloo process groups (forked here, no torchrun), and
how run_cli reports an error on each rank. The scripts under torchrun are test_distributed.py's and test_train.py's."""

import datetime
import json
import os

import pytest
import torch
import torch.multiprocessing
import tqdm.auto
from conftest import free_port

import colintern_launch
import eval as colintern_eval
import mine_hard_negatives as mine
from colintern_cli import UserValueError, run_cli
from colintern_launch import Launch, RankFailed, distributed_run, rank_device, ranks_agree

ONE = Launch()
NODE_OF_4 = [Launch(rank=r, world=4, local_rank=r, local_world=4) for r in range(4)]  # torchrun --nproc_per_node 4
TWO_NODES = [Launch(rank=r, world=2, local_rank=0, local_world=1) for r in range(2)]  # --nnodes 2 --nproc_per_node 1


@pytest.mark.parametrize(
    "spelling,launch,gpus,expected",
    [
        (None, ONE, 0, "cpu"),
        (None, ONE, 2, "cuda:0"),
        ("cpu", ONE, 2, "cpu"),
        ("cuda", ONE, 1, "cuda:0"),
        ("cuda:1", ONE, 2, "cuda:1"),
        (None, NODE_OF_4[3], 4, "cuda:3"),
        ("cuda", NODE_OF_4[2], 4, "cuda:2"),
        ("cpu", NODE_OF_4[3], 4, "cpu"),
        (None, NODE_OF_4[3], 0, "cpu"),
        ("cuda:1", TWO_NODES[1], 2, "cuda:1"),  # one process per node: cuda:N is that process's own GPU on every node
        ("cuda", TWO_NODES[1], 2, "cuda:0"),
    ],
)
def test_each_rank_gets_its_device(spelling, launch, gpus, expected):
    assert rank_device(spelling, "--device", launch, gpus) == expected


@pytest.mark.parametrize(
    "spelling,launch,gpus,allow_auto,message",
    [
        (
            "cuda:0",
            NODE_OF_4[1],
            4,
            False,
            "--device cuda:0 puts all 4 processes of this node on GPU 0: under torchrun pass cuda",
        ),
        (
            "cuda",
            NODE_OF_4[3],
            2,
            False,
            "--device cuda: local rank 3 needs GPU 3, but 2 GPU\\(s\\) are visible; start "
            "at most 2 process\\(es\\) per node",
        ),
        ("cuda:2", ONE, 2, False, "--device cuda:2: 2 GPU\\(s\\) are visible, cuda:0 to cuda:1"),
        ("cuda", ONE, 0, False, "--device cuda: no GPU is visible to this process"),
        ("cuda:0", NODE_OF_4[0], 0, False, "no GPU is visible"),
        ("gpu", ONE, 1, False, "--device gpu: not a device here; use cuda, cuda:N or cpu$"),
        ("mps", ONE, 1, False, "--device mps: not a device here"),
        ("auto", ONE, 2, False, "--device auto: not a device here"),
        (
            "auto",
            NODE_OF_4[0],
            4,
            True,
            "--device_map auto splits one model over this machine's GPUs in one process: "
            "run it with plain `python`, not torchrun",
        ),
        (
            "cuda:x",
            ONE,
            2,
            True,
            "--device_map cuda:x: not a device here; use cuda, cuda:N or cpu \\(or auto, balanced",
        ),
    ],
)
def test_a_spelling_that_cannot_work_is_one_error_naming_the_flag(spelling, launch, gpus, allow_auto, message):
    flag = "--device_map" if allow_auto else "--device"
    with pytest.raises(UserValueError, match=message):
        rank_device(spelling, flag, launch, gpus, allow_auto)


def test_train_splits_one_model_only_in_one_process():
    for split in colintern_launch.SPLITS:
        assert rank_device(split, "--device_map", ONE, 2, allow_auto=True) == split


def test_one_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(colintern_launch.TIMEOUT_ENV, raising=False)
    assert colintern_launch.timeout() == datetime.timedelta(minutes=colintern_launch.DEFAULT_TIMEOUT_MIN)
    monkeypatch.setenv(colintern_launch.TIMEOUT_ENV, "7.5")
    assert colintern_launch.timeout() == datetime.timedelta(minutes=7.5)
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(colintern_launch.TIMEOUT_ENV, bad)
        with pytest.raises(UserValueError, match=f"{colintern_launch.TIMEOUT_ENV}={bad}: minutes, a number above 0"):
            colintern_launch.timeout()


def test_one_process_joins_no_group_and_prints(capsys):
    with distributed_run("cpu") as run:
        assert (run.rank, run.world, run.device) == (0, 1, "cpu")
        assert not torch.distributed.is_initialized()
        run.say("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"


# -----------------------------------------------------------------------------
# The model flags mine and eval share

SHARED = (
    "--ckpt",
    "--model_id",
    "--max_tiles",
    "--device",
    "--dtype",
    "--score_dtype",
    "--quantize",
    "--dim",
    "--attn_implementation",
    "--pool_factor",
)


def flag_actions(parser):
    return {option: action for action in parser._actions for option in action.option_strings}


def test_mine_and_eval_share_one_definition_of_each_model_flag():
    """Same default, help, choices and type in both scripts; only --ckpt's requiredness differs (eval without it
    evaluates the untrained baseline, and its help says so). eval's scores keep their defaults: fp32 scores, the
    model's dtype auto, no pooling."""
    mine_flags, eval_flags = flag_actions(mine.build_parser()), flag_actions(colintern_eval.build_parser())
    for flag in SHARED:
        a, b = mine_flags[flag], eval_flags[flag]
        kind = [getattr(action.type, "__name__", action.type) for action in (a, b)]  # validated(): a closure each
        assert (a.default, a.choices, kind[0]) == (b.default, b.choices, kind[1]), flag
        if flag != "--ckpt":
            assert (a.help, a.required) == (b.help, b.required), flag
    assert mine_flags["--ckpt"].required and not eval_flags["--ckpt"].required
    assert eval_flags["--ckpt"].help.startswith(mine_flags["--ckpt"].help)
    assert "untrained baseline" in eval_flags["--ckpt"].help
    defaults = vars(colintern_eval.build_parser().parse_args([]))
    assert (defaults["score_dtype"], defaults["dtype"], defaults["pool_factor"], defaults["device"]) == (
        "fp32",
        "auto",
        1,
        None,
    )


# -----------------------------------------------------------------------------
# Real process groups: 2 gloo ranks forked from this process


def two_ranks(work, tmp_path) -> dict:
    """work(run, tmp_path) -> a JSON-able observation, in 2 forked gloo ranks -> {rank: observation or the error's
    'Type: message' (with told_rank_0)}."""
    port = free_port()
    torch.multiprocessing.start_processes(rank_main, args=(work, port, tmp_path), nprocs=2, start_method="fork")
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}


def rank_main(rank, work, port, tmp_path):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="localhost",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        with distributed_run("cpu") as run:
            result = {"ok": work(run, tmp_path)}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}", "told_rank_0": getattr(e, "told_rank_0", False)}
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(result))


def fail_on_rank_1(run, tmp_path):
    with ranks_agree("loading the pages", run.world):
        if run.rank == 1:
            raise UserValueError("pages.jsonl line 3: no such page")
    return "past the agreement"


def test_one_ranks_error_stops_both_at_the_agreement(tmp_path):
    got = two_ranks(fail_on_rank_1, tmp_path)
    assert got[1] == {"error": "UserValueError: pages.jsonl line 3: no such page", "told_rank_0": True}
    assert got[0] == {
        "error": "RankFailed: rank 1 of 2 failed while loading the pages: pages.jsonl line 3: no such page",
        "told_rank_0": True,
    }


def a_bug_on_both(run, tmp_path):
    with ranks_agree("scoring", run.world):
        [][run.rank]
    return "unreachable"


def test_ranks_that_all_fail_keep_their_own_errors(tmp_path):
    got = two_ranks(a_bug_on_both, tmp_path)
    assert got[0]["error"] == got[1]["error"] == "IndexError: list index out of range"


def agree_and_observe(run, tmp_path):
    with ranks_agree("nothing", run.world):
        print(f"rank {run.rank} printing")
    gathered = colintern_launch.gather_to_all([run.rank * 10, run.rank * 10 + 1], run.world)
    return {
        "stdout_is_devnull": getattr(__import__("sys").stdout, "name", None) == os.devnull,
        "tqdm_disabled": tqdm.auto.tqdm(range(3)).disable,
        "device": run.device,
        "gathered": gathered,
        "backend": torch.distributed.get_backend(),
    }


def test_every_rank_goes_on_past_an_agreement_and_only_rank_0_prints(tmp_path):
    got = two_ranks(agree_and_observe, tmp_path)
    assert got[0]["ok"] == {
        "stdout_is_devnull": False,
        "tqdm_disabled": False,
        "device": "cpu",
        "gathered": [0, 1, 10, 11],
        "backend": "gloo",
    }
    assert got[1]["ok"] == {**got[0]["ok"], "stdout_is_devnull": True, "tqdm_disabled": True}


# -----------------------------------------------------------------------------
# run_cli on each rank


def raising(error):
    def main(args):
        raise error

    return main


@pytest.mark.parametrize(
    "rank,error,printed",
    [
        (0, UserValueError("bad flag"), "error: bad flag\n"),
        (1, UserValueError("bad flag"), "error: rank 1: bad flag\n"),  # found outside an agreement: rank 0 never saw it
        (0, RankFailed("rank 1 of 2 failed while x: bad"), "error: rank 1 of 2 failed while x: bad\n"),
        (1, RankFailed("rank 0 of 2 failed while x: bad"), ""),
    ],
)
def test_each_rank_prints_an_error_once(monkeypatch, capsys, rank, error, printed):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    with pytest.raises(SystemExit) as exit:
        run_cli(raising(error), None)
    assert exit.value.code == 1 and capsys.readouterr().err == printed


def test_a_told_mistake_is_left_to_rank_0_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    told = UserValueError("bad page")
    told.told_rank_0 = True
    with pytest.raises(SystemExit):
        run_cli(raising(told), None)
    assert capsys.readouterr().err == ""
    bug = KeyError("x")
    bug.told_rank_0 = True
    with pytest.raises(KeyError):
        run_cli(raising(bug), None)
