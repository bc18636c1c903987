"""How train.py, mine_hard_negatives.py and eval.py start and run in many processes: one launch layer.

    from colintern_launch import distributed_run, ranks_agree

    def main(args):
        with distributed_run(args.device, "--device") as run:   # one process, or one rank of torchrun's
            with ranks_agree("loading the model", run.world):  # a step with no collective inside
                model = ...
            run.say("printed once, by rank 0")

- Each rank's device comes from one rule (rank_device), whatever the spelling: cuda, cuda:N, cpu, or none given.
- The process group is joined and left here, NCCL between GPUs and gloo between CPUs, with one timeout.
- ranks_agree makes one rank's error stop every rank at the same place, rank 0 naming the rank and its error,
  instead of leaving the others waiting in the next collective. What it cannot cover (a rank killed, or an error
  inside a collective step such as a training forward) the timeout ends: TIMEOUT_ENV minutes, default 120, long
  enough for rank 0 to run a FAISS search alone while the others wait.
- Only rank 0 prints: the other ranks' stdout, warnings and progress bars are silenced; their own errors still
  reach stderr, a bug's traceback included (see colintern_cli.run_cli).

torchrun's environment gives the rank, world size and local rank on one node or many (its rendezvous), so no code
path depends on the node count. The model flags mine and eval share are defined here once (add_model_flags).
"""

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import warnings

import torch
import torch.distributed as dist

from colintern_cli import UserRuntimeError, UserValueError, trained_model, user_error_message, validated

TIMEOUT_ENV = "COLINTERN_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 120


# -----------------------------------------------------------------------------
# The model flags of mine_hard_negatives.py and eval.py: one definition, one default and one help text each


def add_model_flags(group, ckpt_required: bool) -> None:
    """The flags that load and run a trained ColIntern for encoding and scoring. Whether --ckpt is required is the
    script's: eval.py without it evaluates --model_id's backbone with random heads (the untrained baseline)."""
    from colintern_model import ATTN_HELP, DEFAULT_MODEL_ID, QUANTIZE, check_attn_implementation, check_model_id

    group.add_argument(
        "--ckpt",
        required=ckpt_required,
        default=None,
        type=trained_model,
        help="the trained ColIntern: a .pt checkpoint of train.py (colintern_heads_epoch1.pt), a "
        "folder of export.py or its hub id (owner/name)"
        + (
            ""
            if ckpt_required
            else f". Omit it, with --model_id (e.g. {DEFAULT_MODEL_ID}), for "
            f"the untrained baseline: the backbone with random heads"
        ),
    )
    group.add_argument(
        "--model_id",
        default=None,
        type=validated(check_model_id),
        help="backbone (an -HF hub id or a save_pretrained folder); default: the one the checkpoint "
        "was trained on. The query/page format always comes from the checkpoint",
    )
    group.add_argument(
        "--max_tiles",
        type=int,
        default=None,
        help="at most this many tiles per page (256 tokens per 448px tile); default: the checkpoint's, or 4",
    )
    group.add_argument("--device", default=None, help=DEVICE_HELP)
    group.add_argument(
        "--dtype",
        default="auto",
        help="the model's dtype (encoding): auto (bf16 on a GPU, fp32 on a CPU), bf16, fp16 or fp32. "
        "The scores' dtype is --score_dtype",
    )
    group.add_argument(
        "--score_dtype",
        default="fp32",
        choices=("fp32", "bf16", "fp16", "auto"),
        help="the dtype MaxSim scores in (embeddings rounded to it; per-query sums are fp32 either "
        "way): fp32 (exact scores, the same on every machine), bf16 or fp16 (multiplied in it "
        "where the hardware has it, else in fp32 on the rounded embeddings), or auto (bf16 on a "
        "GPU and on a CPU with native bf16, AVX512-BF16 or AMX; fp32 on other CPUs, where bf16 "
        "is no faster). The pick is printed and "
        "is part of the results' and the page cache's key",
    )
    group.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE,
        help="load the backbone's language model in 8-bit or 4-bit (bitsandbytes; the vision tower "
        "stays bf16, --dtype auto means bf16) or unquantised (none). Default: as the checkpoint "
        "was trained (another choice says so in one line); none for the untrained baseline. Part "
        "of the results' and the page cache's key",
    )
    group.add_argument(
        "--attn_implementation", default="sdpa", type=validated(check_attn_implementation), help=ATTN_HELP
    )
    group.add_argument(
        "--dim",
        type=int,
        default=None,
        help="encode and score at this vector size: one of the Matryoshka prefixes the checkpoint was "
        "trained with (train.py --matryoshka_dims), each vector cut to it and renormalised: a "
        "smaller index and search. Default: the full size. Part of the results' and the page "
        "cache's key",
    )
    group.add_argument(
        "--pool_factor",
        type=int,
        default=1,
        help="pool each page's vectors into max(1, L // F) (Ward clustering, renormalised means; "
        "queries are never pooled) before they are kept and scored with the same exact MaxSim: "
        "about F times smaller a page index and search. 1: no pooling. Part of the results' and "
        "the page cache's key",
    )


DEVICE_HELP = (
    "where the model and the scoring run: cuda (cuda:LOCAL_RANK under torchrun), cuda:N (one process; "
    "under torchrun only with one process per node), or cpu. Default: cuda if there is a GPU, else cpu"
)


# -----------------------------------------------------------------------------
# Each rank's device


@dataclasses.dataclass(frozen=True)
class Launch:
    """What torchrun says about this process (plain `python`: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, env=os.environ) -> "Launch":
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(
            int(env.get("RANK", "0")),
            world,
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )


# from_pretrained's device_map strategies that split one model over a machine's GPUs (train.py's --device_map)
SPLITS = ("auto", "balanced", "balanced_low_0", "sequential")


def rank_device(spelling: str | None, flag: str, launch: Launch, gpus: int, allow_auto: bool = False) -> str:
    """-> this rank's device ('cuda:K' or 'cpu'; with allow_auto, one of SPLITS as given, in one process) for the
    flag's value `spelling` on a machine with `gpus` visible GPUs; a spelling that cannot work raises UserValueError
    naming the flag. Under torchrun every rank takes its own GPU, cuda:LOCAL_RANK; cuda:N names one GPU, so it is
    taken only where it is every rank's own: one process per node."""
    under = launch.world > 1
    where = f"{flag} {spelling}"
    if spelling in SPLITS and allow_auto:
        if under:
            raise UserValueError(
                f"{where} splits one model over this machine's GPUs in one process: run it with "
                "plain `python`, not torchrun (DDP needs one device per process)"
            )
        return spelling
    if spelling is None:
        spelling = "cuda" if gpus else "cpu"
    try:
        device = torch.device(spelling)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise UserValueError(
            f"{where}: not a device here; use cuda, cuda:N or cpu"
            + (f" (or {', '.join(SPLITS)}: one model split over this machine's GPUs)" if allow_auto else "")
        )
    if device.type == "cpu":
        return "cpu"
    if not gpus:
        raise UserValueError(
            f"{where}: no GPU is visible to this process (torch.cuda.is_available() is False); "
            "use cpu, or check CUDA_VISIBLE_DEVICES and the driver"
        )
    if device.index is None:
        index = launch.local_rank if under else 0
    elif under and launch.local_world > 1:
        raise UserValueError(
            f"{where} puts all {launch.local_world} processes of this node on GPU {device.index}: "
            f"under torchrun pass cuda (process k takes cuda:k of its node) and choose the GPUs "
            f"with CUDA_VISIBLE_DEVICES"
        )
    else:
        index = device.index
    if index >= gpus:
        if device.index is None:
            raise UserValueError(
                f"{where}: local rank {index} needs GPU {index}, but {gpus} GPU(s) are visible; "
                f"start at most {gpus} process(es) per node (--nproc_per_node)"
            )
        raise UserValueError(f"{where}: {gpus} GPU(s) are visible, cuda:0 to cuda:{gpus - 1}")
    return f"cuda:{index}"


# -----------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Run:
    rank: int
    world: int
    device: str

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 only."""
        if self.rank == 0:
            print(*args, **kwargs)


def timeout() -> datetime.timedelta:
    """How long a collective waits for a rank that neither answers nor raises (TIMEOUT_ENV minutes)."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(value)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:
        raise UserValueError(f"{TIMEOUT_ENV}={value}: minutes, a number above 0")
    return datetime.timedelta(minutes=minutes)


@contextlib.contextmanager
def distributed_run(device: str | None, flag: str = "--device", allow_auto: bool = False):
    """Around a script's work, in one process or as one rank under torchrun: decides this rank's device from the
    flag's value (rank_device), joins the process group (NCCL on GPUs, gloo on CPUs; one timeout), silences every
    rank but 0, and leaves the group at the end, also on an error. Yields a Run."""
    launch = Launch.from_env()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    run = Run(launch.rank, launch.world, rank_device(device, flag, launch, gpus, allow_auto))
    if launch.world == 1:
        yield run
        return
    cuda = run.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(run.device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout())
    try:
        with rank_zero_prints(launch.rank):
            yield run
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def rank_zero_prints(rank: int):
    """On ranks other than 0: stdout to nowhere, no warnings (Python's, or logged ones below ERROR: transformers'),
    no progress bars (every tqdm bar, ours and the libraries', starts disabled); stderr stays, for errors."""
    if rank == 0:
        yield
        return
    from tqdm import std

    init = std.tqdm.__init__
    std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    logging.disable(logging.WARNING)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        std.tqdm.__init__ = init
        logging.disable(logging.NOTSET)


# -----------------------------------------------------------------------------
# Many ranks, one outcome


class RankFailed(UserRuntimeError):
    """Raised on every rank when another rank failed inside ranks_agree; rank 0 prints it, the others stay quiet."""

    told_rank_0 = True


@contextlib.contextmanager
def ranks_agree(what: str, world: int):
    """Around a step every rank runs with no collective inside: afterwards the ranks tell each other whether it
    failed (one small all-reduce; the messages only if one did), so that one rank's error stops all of them here.
    A rank's own error is re-raised as it is, marked as told to rank 0 (run_cli then leaves it to rank 0 to print a
    user's mistake); the others raise RankFailed 'rank R of N failed while WHAT: ...'."""
    error = None
    try:
        yield
    except Exception as e:
        error = e
    if world > 1:
        flag = torch.tensor([error is not None], dtype=torch.int64, device=collective_device())
        dist.all_reduce(flag)
        if int(flag.item()):
            message = None if error is None else (user_error_message(error) or f"{type(error).__name__}: {error}")
            messages = [None] * world
            dist.all_gather_object(messages, message)
            r, first = next((r, m) for r, m in enumerate(messages) if m is not None)
            if error is None:
                raise RankFailed(f"rank {r} of {world} failed while {what}: {first}")
            error.told_rank_0 = True
    if error is not None:
        raise error


def collective_device() -> torch.device:
    """Where this process group's tensors live: this rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def rank_share(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of n items (units of work: batches, query blocks): sizes differ by <= 1."""
    return range(n * rank // world, n * (rank + 1) // world)


def gather_to_all(items: list, world: int) -> list:
    """Each rank's list -> the lists of all ranks concatenated in rank order, on every rank."""
    if world == 1:
        return items
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]
