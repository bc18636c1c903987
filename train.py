r"""Train ColIntern: frozen InternVL3.5 backbone, query/page heads (+ LoRA), in-batch InfoNCE over MaxSim.

    # epoch 1: in-batch negatives on the ColPali training set
    python train.py --model_id OpenGVLab/InternVL3_5-1B-HF --train_hub vidore/colpali_train_set \
        --out_dir outputs/colintern-1b-e1 --batch_size 32 --grad_accum 2 --epochs 1 --lr 2e-4 \
        --lora --optimizer paged_adamw_8bit --gradient_checkpointing --save_every 500
    # epoch 2: hard negatives mined with the epoch-1 model, warm start from its checkpoint (epoch counter goes on)
    python mine_hard_negatives.py --ckpt outputs/colintern-1b-e1/colintern_heads_epoch1.pt \
        --train_hub vidore/colpali_train_set --split train --out outputs/mined.jsonl --k 8
    python train.py --train_jsonl outputs/mined.jsonl --num_negs 2 --out_dir outputs/colintern-1b-e2 \
        --resume_ckpt outputs/colintern-1b-e1/colintern_heads_epoch1.pt --batch_size 32 --epochs 1 --lr 1e-4
    # continue an interrupted run exactly: same command + the last step snapshot
    python train.py ... --resume_ckpt outputs/colintern-1b-e1/colintern_heads_step1500.pt
    # many GPUs (DDP; pages are gathered across ranks as in-batch negatives); a 38B split over one machine's GPUs
    torchrun --nproc_per_node 4 train.py --train_hub vidore/colpali_train_set --out_dir outputs/ddp ...
    python train.py --model_id OpenGVLab/InternVL3_5-38B-HF --device_map auto --lora ...
    # a 14B or 38B backbone on one 48-80 GB GPU: its language model in 4-bit NF4 (QLoRA), LoRA and heads in fp32
    python train.py --model_id OpenGVLab/InternVL3_5-14B-HF --quantize 4bit --lora --gradient_checkpointing ...

Writes into --out_dir (rank 0 only): training_loss.txt (`# step epoch loss lr`, one line per optimizer step),
colintern_heads_step{N}.pt every --save_every steps (and at Ctrl-C or at --max_steps), colintern_heads_epoch{E}.pt
at each epoch end, args.json (arguments + git commit).

Checkpoints: a step snapshot holds heads + LoRA, optimizer, scheduler and the data position, so resuming it with the
same flags and data continues exactly. An epoch checkpoint holds heads + LoRA only (no optimizer): resuming it is a
warm start with a fresh optimizer and schedule, e.g. on newly mined data; its epoch and step counters go on.
Randomness: the only random draw in a step is LoRA dropout; torch is reseeded from (--seed, rank, step) before every
optimizer step, and negatives are drawn from (--seed, epoch, row), so no RNG state needs saving to resume exactly.

Batches: --batch_size is the micro-batch (what fits in memory); --grad_accum micro-batches form ONE contrastive batch
through gradient caching (see grad_cache_step), so each loss sees batch_size x grad_accum x processes queries against
all their pages. Precision: LoRA and heads train in fp32 over a bf16/fp16 backbone (fp16 adds loss scaling), or over
one whose language model bitsandbytes holds in 8 or 4 bits (--quantize; the vision tower stays bf16).
"""

import argparse
import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (all_gather with gradients, gather_pages)
import torch.nn as nn
from PIL import Image

from colintern_checkpoint import checkpoint_quantization, first_non_finite, load_checkpoint, say_if_quantization_differs
from colintern_cli import (
    ArgumentParser,
    UserFileExistsError,
    UserFloatingPointError,
    UserImportError,
    UserRuntimeError,
    UserValueError,
    progress_bar,
    run_cli,
    trained_model,
    validated,
)
from colintern_data import (
    PageResolver,
    atomic_path,
    check_output,
    file_sha1,
    pseudo_path,
    read_queries,
    read_triples,
    write_json,
)
from colintern_launch import distributed_run, ranks_agree
from colintern_loss import QueryPageEncoder, StepLoss, contrastive_loss, step_forward_backward
from colintern_model import (
    ATTN_HELP,
    DEFAULT_MODEL_ID,
    QUANTIZE,
    ColIntern,
    ColInternProcessor,
    LoraSettings,
    check_attn_implementation,
    check_model_id,
    resolve_dtype,
    save_checkpoint,
)
from colintern_scoring import dtype_name

OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw")
WEIGHT_DECAY = 0.0  # as colpali-engine's recipes (HF Trainer default)
LOSS_LOG = "training_loss.txt"
LOSS_LOG_HEADER = "# step epoch loss lr\n"
LORA_DEFAULTS = LoraSettings()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("model")
    g.add_argument(
        "--model_id",
        default=None,
        type=validated(check_model_id),
        help=f"HF-native InternVL3.5 checkpoint (hub id ending in -HF, or a save_pretrained folder); "
        f"default {DEFAULT_MODEL_ID}, or the --resume_ckpt's model",
    )
    g.add_argument(
        "--proj_dim",
        type=int,
        default=None,
        help="size of each query/page vector (the heads' output); default 128, or the checkpoint's",
    )
    g.add_argument(
        "--max_tiles",
        type=int,
        default=None,
        help="at most this many tiles per page (+1 thumbnail when tiled; 256 tokens per 448px tile); "
        "default 4, or the checkpoint's",
    )
    g.add_argument(
        "--lora",
        action="store_true",
        help="add LoRA adapters to the language model (vision tower stays frozen) and train them; "
        "a resumed checkpoint with LoRA keeps it without this flag",
    )
    g.add_argument("--lora_r", type=int, default=None, help=f"LoRA rank (default {LORA_DEFAULTS.r})")
    g.add_argument("--lora_alpha", type=int, default=None, help=f"LoRA alpha (default {LORA_DEFAULTS.alpha})")
    g.add_argument(
        "--lora_dropout", type=float, default=None, help=f"dropout on the LoRA input (default {LORA_DEFAULTS.dropout})"
    )
    g.add_argument(
        "--dtype",
        default="auto",
        help="frozen backbone dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32; LoRA, heads, "
        "gradients and optimizer states stay fp32; fp16 adds dynamic loss scaling",
    )
    g.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE,
        help="store the frozen language model's linear layers in 8-bit (LLM.int8) or 4-bit NF4 with double "
        "quantisation (QLoRA) through bitsandbytes: about 1/2 or 1/4 of their bf16 memory (8B: "
        "16 GB -> ~5.5 GB at 4bit). Vision tower, projector, embeddings and norms stay bf16 (--dtype "
        "auto means bf16 then, on a CPU too; fp32 is refused); LoRA, heads and optimizer states stay "
        "fp32. Default: none, or the --resume_ckpt's (a step snapshot must keep it; a warm start may "
        "change it, and says so)",
    )
    g.add_argument(
        "--device_map",
        default=None,
        help="passed to from_pretrained: 'auto' splits a backbone too big for one GPU (e.g. 38B) over "
        "this machine's GPUs (one process, no torchrun). Default: cuda:LOCAL_RANK under torchrun, "
        "else cuda if available, else cpu",
    )
    g.add_argument(
        "--attn_implementation",
        default="sdpa",
        type=validated(check_attn_implementation),
        help=ATTN_HELP + " (a step snapshot must keep it)",
    )
    g.add_argument(
        "--bidirectional",
        action="store_true",
        help="the language model attends both ways over a query's or a page's own tokens (padding stays "
        "masked) instead of causally, as Nemotron ColEmbed V2, ColVec1.1 and EVIE encode. Recorded in "
        "the checkpoint: mining, eval and export then always encode this way. A warm start keeps its "
        "checkpoint's setting unless this flag turns it on",
    )
    g.add_argument(
        "--matryoshka_dims",
        default=None,
        type=validated(check_dims),
        help="Matryoshka multi-vector heads (EVIE's prefix-MRL): a comma list of vector sizes, e.g. "
        "128,64,32. The loss is the plain sum of the contrastive loss at each prefix of every vector "
        "(each prefix renormalised), so that mining, eval and search can later pick any of them with "
        "--dim: a smaller index without retraining. The largest must be --proj_dim (added if left "
        "out). Recorded in the checkpoint; a warm start keeps its checkpoint's unless given",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute backbone activations in the backward pass (less memory, more compute); "
        "only matters with --lora (without LoRA nothing is back-propagated through the backbone)",
    )
    g.add_argument(
        "--compile_heads",
        action="store_true",
        help="accepted so the original ColIntern commands run as written; does nothing (the heads are "
        "a negligible part of a step)",
    )

    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--train_hub",
        default=None,
        help="hub dataset or local dataset folder with vidore/colpali_train_set columns (query, image); "
        "one positive page per row, in-batch negatives only",
    )
    src.add_argument(
        "--train_jsonl",
        default=None,
        help='JSONL of {"query", "pos", "negs"} (e.g. from mine_hard_negatives.py); pages are image '
        "paths under --root or HF pseudo-paths DATASET/SPLIT/doc_N.png (row N of that dataset)",
    )
    g.add_argument("--split", default="train", help="split of --train_hub")
    g.add_argument("--root", default=".", help="folder that image paths in --train_jsonl are relative to")
    g.add_argument(
        "--num_negs",
        type=int,
        default=None,
        help="hard negatives drawn per query per step from its 'negs' (default 1 with --train_jsonl; "
        "rows with fewer are topped up with random other pages); must be 0 with --train_hub",
    )
    g.add_argument(
        "--batch_by",
        default=None,
        metavar="COLUMN",
        help="draw each contrastive batch (all micro-batches of a step, on every rank) from rows that "
        "share this column's value: a --train_hub column (source in vidore/colpali_train_set) or a "
        "--train_jsonl field. Same-source in-batch negatives are harder (nomic-embed-multimodal: +2.9 "
        "nDCG@5 on ViDoRe v2). Seeded and resumable; each source's remainder below one step is left "
        "out of the epoch, and counted. Do not batch by a column whose rows answer each other's "
        "queries (a page title): the in-batch negatives would be false ones",
    )
    g.add_argument(
        "--num_workers",
        type=int,
        default=2,
        help="DataLoader worker processes that decode and tile the pages (0: in the main process)",
    )
    g.add_argument("--prefetch_factor", type=int, default=2, help="batches each worker prepares ahead")

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch_size", type=int, default=32, help="queries per device per micro-batch: what must fit in memory at once"
    )
    g.add_argument(
        "--auto_batch",
        action="store_true",
        help="on CUDA, halve --batch_size until a worst-case micro-step fits and raise --grad_accum by "
        "the same factor, so one loss still sees as many queries and pages. The probe runs a "
        "micro-batch of 64-word queries and max-tile pages (+ hard negatives) with its graph, in "
        "one loss against stand-ins for every micro-batch's and rank's pages; while it runs it keeps "
        "free what it does not hold itself: the optimizer states, DDP's gradient buckets, the "
        "step's cached image features, and --auto_batch_margin. On CPU (no out-of-memory signal) "
        "keeps --batch_size",
    )
    g.add_argument(
        "--auto_batch_margin",
        type=float,
        default=0.05,
        help="fraction of the GPU's memory --auto_batch also keeps free, for NCCL's buffers and the "
        "allocator's fragmentation over varying batch lengths; 0.05 is 7 GB of an H200 (default "
        "%(default)s)",
    )
    g.add_argument(
        "--grad_accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step (default %(default)s). With more than one, gradient "
        "caching makes them ONE contrastive batch: each loss sees batch_size x grad_accum x "
        "processes queries against all their pages, batch_size x grad_accum x processes x "
        "(1 + num_negs), while activations are held for one micro-batch at a time (the language "
        "model runs over each page twice, once without a graph and once with; the frozen vision "
        "tower once, its output kept between the two: see --offload_image_features)",
    )
    g.add_argument(
        "--offload_image_features",
        action="store_true",
        help="with gradient caching, keep each page's image features (the frozen vision tower's output, "
        "computed once a step and reused by the second pass) in pinned CPU memory instead of on the "
        "GPU. They take image tokens x hidden x 2 bytes a tile (256 x hidden: 0.5 MB at 1B, 2.6 MB "
        "at 38B), ~0.67 GB at 1B and ~3.4 GB at 38B for 256 pages of 5 tiles, times (1 + "
        "num_negs); the copies cost PCIe time. Same numbers either way",
    )
    g.add_argument("--epochs", type=int, default=1, help="passes over the training data in this run")
    g.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps of this run (the schedule then spans them); "
        "default: all the steps of --epochs",
    )
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    g.add_argument(
        "--warmup_steps",
        type=int,
        default=100,
        help="linear warmup: step s of the first N runs at (s + 1) / (N + 1) of --lr; then cosine decay "
        "from --lr toward 0, which it reaches one step after the run's last (so the last step is "
        "not wasted at lr 0). A warmup longer than a fifth of the run is said at the start",
    )
    g.add_argument(
        "--optimizer",
        default="paged_adamw_8bit",
        choices=OPTIMIZERS,
        help="bitsandbytes paged/8-bit AdamW or torch AdamW; paged falls back to non-paged on CPU",
    )
    g.add_argument(
        "--temperature", type=float, default=0.02, help="InfoNCE temperature on MaxSim scores divided by query length"
    )
    g.add_argument("--seed", type=int, default=0, help="seed for head/LoRA init, data order, negatives, dropout")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--out_dir", required=True, help="folder for checkpoints, training_loss.txt and args.json")
    g.add_argument(
        "--save_every",
        type=int,
        default=500,
        help="write colintern_heads_step{N}.pt every N optimizer steps (0: only at epoch ends)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out_dir that holds another run's files (args.json, training_loss.txt, "
        "colintern_heads_*.pt), replacing what this run writes; without it such a folder is refused, "
        "unless --resume_ckpt is one of its checkpoints or the same flags ran there before",
    )
    g.add_argument(
        "--resume_ckpt",
        default=None,
        type=trained_model,
        help="a step snapshot continues that run exactly (same flags and data); an epoch checkpoint "
        "(or any heads checkpoint, export.py folder or its hub id) is a warm start: heads + LoRA "
        "loaded, fresh optimizer",
    )
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    for flag in ("batch_size", "grad_accum", "epochs", "prefetch_factor"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("num_workers", "save_every", "warmup_steps"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.num_negs is None:
        args.num_negs = 1 if args.train_jsonl else 0
    if args.num_negs < 0:
        p.error(f"--num_negs must be >= 0, got {args.num_negs}")
    if args.train_hub and args.num_negs:
        p.error(
            "--train_hub rows have one positive and no hard negatives: drop --num_negs, or mine negatives with "
            "mine_hard_negatives.py and train on its --train_jsonl"
        )
    if not 0 <= args.auto_batch_margin < 1:
        p.error(f"--auto_batch_margin is a fraction of the GPU's memory in [0, 1), got {args.auto_batch_margin}")
    for flag in ("lr", "temperature"):
        if not math.isfinite(getattr(args, flag)) or getattr(args, flag) <= 0:
            p.error(f"--{flag} must be a finite number > 0, got {getattr(args, flag)}")


# -----------------------------------------------------------------------------
# Data: training rows, the seeded batch order, collation (decoding and tiling happen in the DataLoader workers)


class HubPairs(torch.utils.data.Dataset):
    """Rows of a dataset with vidore/colpali_train_set's columns: a query and its one positive page."""

    def __init__(self, name: str, split: str, batch_by: str | None = None):
        self.name, self.split, self.what = name, split, f"--train_hub {name} split {split!r}"
        self.resolver = PageResolver(root=None)  # the rows' pseudo-paths only, never a file
        ds = self.resolver.dataset(name, split, columns=("query", "image"))
        self.queries = read_queries(ds, self.what)  # images stay undecoded until a worker asks
        if batch_by is not None and batch_by not in ds.column_names:
            raise UserValueError(
                f"--batch_by {batch_by}: {self.what} has no such column (it has {', '.join(ds.column_names)})"
            )
        self.groups = None if batch_by is None else [str(v) for v in ds[batch_by]]
        self.fingerprint = {"source": "hub", "rows": len(ds), "id": getattr(ds, "_fingerprint", None)}
        self.label = f"{name} split {split} ({len(ds)} rows, in-batch negatives)"

    def __len__(self):
        return len(self.queries)

    def __getitem__(self, key):
        _, i = key
        page = self.resolver(pseudo_path(self.name, self.split, i), f"{self.what} row {i}")
        return {"query": self.queries[i], "pos": page, "negs": []}


class JsonlTriples(torch.utils.data.Dataset):
    """Rows of a {"query", "pos", "negs"} JSONL. Every page reference is checked up front (no decoding); images
    are read lazily by the workers. Each step draws num_negs of a row's negatives, seeded by (seed, epoch, row)."""

    def __init__(self, path: str, root: str, num_negs: int, seed: int, batch_by: str | None = None):
        self.path, self.num_negs, self.seed = path, num_negs, seed
        self.rows = read_triples(path)
        self.groups = None
        if batch_by is not None:
            missing = [row["line"] for row in self.rows if batch_by not in row["fields"]]
            if missing:
                raise UserValueError(
                    f"--batch_by {batch_by}: {path} line {missing[0]} has no {batch_by!r} field "
                    f"({len(missing)} row(s) lack it)"
                )
            self.groups = [str(row["fields"][batch_by]) for row in self.rows]
        self.resolver = PageResolver(root)
        checked = set()
        for row in progress_bar(
            self.rows, desc="checking pages", unit="row", mininterval=2, disable=len(self.rows) < 5000
        ):
            for ref in [row["pos"], *row["negs"]]:
                if ref not in checked:
                    self.resolver.check(ref, where=f"{path} line {row['line']}")
                    checked.add(ref)
        # pages to top up rows with fewer negatives than num_negs (any other row's positive)
        self.pool = sorted({row["pos"] for row in self.rows})
        self.short = sum(len(row["negs"]) < num_negs for row in self.rows)
        if num_negs and len(self.pool) < 2 and self.short:
            raise UserValueError(f"{path}: rows lack negatives and there is no other page to draw one from")
        self.fingerprint = {"source": "jsonl", "rows": len(self.rows), "id": file_sha1(path)}
        self.label = f"{path} ({len(self.rows)} rows, {num_negs} hard negative(s) per query)"

    def __len__(self):
        return len(self.rows)

    def negatives(self, epoch: int, i: int) -> list:
        row = self.rows[i]
        rng = random.Random(f"{self.seed}:{epoch}:{i}")
        negs = rng.sample(row["negs"], min(self.num_negs, len(row["negs"])))
        while len(negs) < self.num_negs:
            ref = self.pool[rng.randrange(len(self.pool))]
            if ref != row["pos"]:
                negs.append(ref)
        return negs

    def __getitem__(self, key):
        epoch, i = key
        row = self.rows[i]
        where = f"{self.path} line {row['line']}"
        return {
            "query": row["query"],
            "pos": self.resolver(row["pos"], where),
            "negs": [self.resolver(ref, where) for ref in self.negatives(epoch, i)],
        }


class EpochBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of one epoch, as (epoch, row) keys: the epoch's seeded order (epoch_order) cut into
    global batches of batch_size x world rows, rank r taking slice r of each (so one process with the global batch
    sees the same rows in the same order). Starts at micro-batch `start`: consumed batches are skipped by index,
    undecoded. `groups`: each row's --batch_by value, so that the `step_rows` rows of a step share one."""

    def __init__(
        self,
        n_rows: int,
        epoch: int,
        seed: int,
        batch_size: int,
        rank: int,
        world: int,
        n_batches: int,
        start: int = 0,
        groups: list | None = None,
        step_rows: int = 0,
    ):
        self.n_rows, self.epoch, self.seed = n_rows, epoch, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.n_batches, self.start = n_batches, start
        self.groups, self.step_rows = groups, step_rows

    def __len__(self):
        return max(0, self.n_batches - self.start)

    def __iter__(self):
        order = epoch_order(self.n_rows, self.epoch, self.seed, self.groups, self.step_rows)
        global_batch = self.batch_size * self.world
        for b in range(self.start, self.n_batches):
            lo = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[lo : lo + self.batch_size]]


def epoch_order(n_rows: int, epoch: int, seed: int, groups: list | None = None, step_rows: int = 0) -> list:
    """The rows of an epoch in the order they are trained on, seeded by (seed, epoch): a permutation of all rows;
    or, with groups, each group's rows permuted and cut into whole steps of step_rows (a remainder below one step is
    left out), the steps of all groups then shuffled, so that every step's rows share one group."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if groups is None:
        return torch.randperm(n_rows, generator=g).tolist()
    members = {}
    for i, label in enumerate(groups):
        members.setdefault(label, []).append(i)
    steps = []
    for label in sorted(members):  # a fixed order for the draws below
        rows = [members[label][j] for j in torch.randperm(len(members[label]), generator=g).tolist()]
        steps += [rows[k : k + step_rows] for k in range(0, len(rows) - step_rows + 1, step_rows)]
    return [i for s in torch.randperm(len(steps), generator=g).tolist() for i in steps[s]]


def rows_per_epoch(n_rows: int, groups: list | None, step_rows: int) -> int:
    """How many rows an epoch trains on: whole steps only (of all rows, or of each group's)."""
    if groups is None:
        return n_rows // step_rows * step_rows
    sizes = collections.Counter(groups).values()
    return sum(size // step_rows * step_rows for size in sizes)


class Collate:
    """Examples -> model inputs: queries, then pages = every positive, then every query's negatives in query order.
    Page pixels stay uint8 (ColInternProcessor.process_pages): a 5-tile 448px page is 2.9 MiB of DataLoader shared
    memory instead of 11.5 MiB in fp32."""

    def __init__(self, processor: ColInternProcessor):
        self.processor = processor

    def __call__(self, examples):
        pages = [e["pos"] for e in examples] + [n for e in examples for n in e["negs"]]
        return {
            "queries": dict(self.processor.process_queries([e["query"] for e in examples])),
            "pages": dict(self.processor.process_pages(pages)),
            "n_queries": len(examples),
        }


def load_training_rows(args):
    if args.train_hub:
        return HubPairs(args.train_hub, args.split, args.batch_by)
    return JsonlTriples(args.train_jsonl, args.root, args.num_negs, args.seed, args.batch_by)


# -----------------------------------------------------------------------------
# Model, optimizer, schedule


def parse_dims(text: str) -> list:
    """'128,64,32' -> [128, 64, 32]."""
    return [int(x) for x in text.split(",")]


def check_dims(text: str) -> None:
    try:
        dims = parse_dims(text)
    except ValueError:
        dims = None
    if not dims or min(dims) < 1:
        raise ValueError(f"expected sizes above 0 separated by commas, e.g. 128,64,32; got {text!r}")


def build_model(args, ckpt: dict | None, device_map, say=print):
    """A fresh model from the flags, or one with the checkpoint's shape (heads + LoRA loaded). Flags that would
    build another shape than the checkpoint's are an error rather than a silent choice. The backbone's quantisation
    is --quantize, else the checkpoint's; a warm start onto another one says so (a step snapshot's run_config
    refuses it)."""
    meta = ckpt["meta"] if ckpt else None
    lora = None
    if meta is None:
        if args.lora:
            lora = LoraSettings(
                r=args.lora_r or LORA_DEFAULTS.r,
                alpha=args.lora_alpha or LORA_DEFAULTS.alpha,
                dropout=LORA_DEFAULTS.dropout if args.lora_dropout is None else args.lora_dropout,
            )
        elif any(v is not None for v in (args.lora_r, args.lora_alpha, args.lora_dropout)):
            raise UserValueError("--lora_r/--lora_alpha/--lora_dropout need --lora")
        proj_dim, max_tiles = args.proj_dim or 128, args.max_tiles or 4
    else:
        source = f"--resume_ckpt {args.resume_ckpt}"
        if meta["lora"] is not None:
            lora = LoraSettings(**meta["lora"])
        elif args.lora:
            raise UserValueError(f"{source} has no LoRA; drop --lora (a warm start keeps the checkpoint's layout)")
        for flag, ours in (
            ("proj_dim", meta["proj_dim"]),
            ("lora_r", lora and lora.r),
            ("lora_alpha", lora and lora.alpha),
            ("lora_dropout", lora and lora.dropout),
        ):
            if getattr(args, flag) is not None and getattr(args, flag) != ours:
                raise UserValueError(
                    f"{source} was trained with --{flag} {ours}, this run asks for "
                    f"--{flag} {getattr(args, flag)}: drop the flag or start a fresh run"
                )
        proj_dim, max_tiles = meta["proj_dim"], args.max_tiles or meta["max_tiles"]
    model_id = args.model_id or (meta["model_id"] if meta else DEFAULT_MODEL_ID)
    quantize = args.quantize or (checkpoint_quantization(meta) if meta else "none")
    if meta is not None and (ckpt.get("train_state") or {}).get("kind") != "step":
        say_if_quantization_differs(meta, quantize, f"--resume_ckpt {args.resume_ckpt}", say)
    dtype = resolve_dtype(args.dtype, device_map, quantize)
    torch.manual_seed(args.seed)  # heads and LoRA start from the same weights on every rank and every rerun
    bidirectional = args.bidirectional or bool(meta and meta.get("bidirectional"))
    matryoshka_dims = (
        parse_dims(args.matryoshka_dims) if args.matryoshka_dims else (meta.get("matryoshka_dims") if meta else None)
    )
    model, processor = ColIntern.from_pretrained(
        model_id,
        proj_dim=proj_dim,
        lora=lora,
        max_tiles=max_tiles,
        dtype=dtype,
        device_map=device_map,
        quantize=quantize,
        attn_implementation=args.attn_implementation,
        bidirectional=bidirectional,
        matryoshka_dims=matryoshka_dims,
    )
    if ckpt is not None:
        model.load_trainable_state(ckpt, source=f"--resume_ckpt {args.resume_ckpt}")
    return model, processor


def make_optimizer(name: str, params: list, lr: float, say=print):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserImportError(
            f"--optimizer {name} needs bitsandbytes (pip install bitsandbytes), or use --optimizer adamw"
        ) from e
    on_cuda = all(p.is_cuda for p in params)
    if name == "paged_adamw_8bit" and not on_cuda:
        say("--optimizer paged_adamw_8bit: paging needs CUDA; using the non-paged bitsandbytes AdamW8bit on CPU")
        name = "adamw_8bit"
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=WEIGHT_DECAY)


# The schedule's definition, in step snapshots' run config: a snapshot made under another definition is refused
# (check_same_run) rather than resumed on a schedule it did not start. Change it whenever warmup_cosine changes.
SCHEDULE = "linear warmup (s+1)/(N+1), then cosine from 1 to 0 at s = total_steps"
WARMUP_SHARE_NOTED = 0.2  # a warmup longer than this share of the run is said at the start


def warmup_note(warmup_steps: int, total_steps: int, lr: float) -> str | None:
    """A line for a run whose warmup takes more than WARMUP_SHARE_NOTED of it (a short run under the default 100
    warmup steps never nears --lr), else None."""
    if warmup_steps <= WARMUP_SHARE_NOTED * total_steps:
        return None
    factor = warmup_cosine(warmup_steps, total_steps)
    top = max(factor(s) for s in range(total_steps))
    return (
        f"--warmup_steps {warmup_steps} is {warmup_steps / total_steps:.0%} of this run's {total_steps} steps: "
        f"the lr peaks at {top * lr:.3g} ({top:.0%} of --lr {lr:g}); lower --warmup_steps for a short run"
    )


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Multiplier of the peak lr at optimizer step s (0-based): linear warmup ((s + 1) / (N + 1) for the first N
    steps), then cosine from 1 toward 0, reached at s = total_steps (one after the last step)."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_step(seed: int, rank: int, step: int) -> None:
    """Dropout masks are a function of (seed, rank, step): a resumed run draws exactly what the straight one did."""
    torch.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) % (2**63))


def find_batch_size(try_batch, start: int, say=print) -> int:
    """Largest batch size <= start (halving) for which try_batch(b) raises no CUDA out-of-memory error.
    Not accelerate's find_executable_batch_size: it recognises out-of-memory by message text (" out of memory."),
    so torch's cudaMallocAsync backend's OutOfMemoryError ("... (out of memory)") would escape it, and halving (so
    --grad_accum grows by a whole factor) and saying each size need a closure that tracks the size it hides."""
    size = start
    while True:
        fits = True
        try:
            try_batch(size)
        except torch.cuda.OutOfMemoryError:
            fits = False  # leave the except block first, so the exception's frames (and tensors) are freed
        if fits:
            return size
        if size == 1:
            raise UserRuntimeError(
                "--auto_batch: even one query per device runs out of GPU memory; lower --max_tiles, "
                "add --gradient_checkpointing, or use more GPUs / --device_map auto"
            )
        say(f"--auto_batch: batch {size} runs out of GPU memory, trying {size // 2}")
        size //= 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def probe_page(processor: ColInternProcessor) -> Image.Image:
    """A page that tiles to the most tiles --max_tiles allows (+ the thumbnail)."""
    tile = processor.hf.image_processor.size["height"]
    return Image.new("RGB", (tile * processor.max_tiles, tile), "white")


def probe_batch(
    model: ColIntern, processor: ColInternProcessor, num_negs: int, temperature: float, step_queries: int, world: int
):
    """A worst-case training micro-step at micro-batch b: b 64-word queries and b x (1 + num_negs) pages of
    max_tiles tiles, with their graph, in ONE loss over the whole step as gradient caching computes it: this rank's
    `step_queries` queries against the pages of every rank. The other micro-batches' and ranks' embeddings are
    stand-ins without a graph (copies), as the cache holds them: both phases of a step at once, an upper bound.
    What a step holds besides is probe_headroom's, kept free while this runs."""
    page = probe_page(processor)

    def try_batch(b):
        try:
            q, q_mask = model.forward_queries(processor.process_queries(["word " * 64] * b))
            p, p_mask = model.forward_pages(processor.process_pages([page] * (b * (1 + num_negs))))
            copies_q = -(-step_queries // b)  # micro-batches of this rank in one step
            copies_p = copies_q * world  # ... of every rank
            q_all = torch.cat([q] + [q.detach()] * (copies_q - 1))  # (step_queries, Lq, D)
            p_all = torch.cat([p] + [p.detach()] * (copies_p - 1))  # (world x step_queries x (1 + negs), Lp, D)
            loss = contrastive_loss(
                q_all,
                q_mask.repeat(copies_q, 1),
                p_all,
                p_mask.repeat(copies_p, 1),
                torch.arange(q_all.shape[0]),
                temperature,
            )
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    return try_batch


BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256  # bitsandbytes' 8-bit optimizers: smaller tensors keep fp32 states


def optimizer_state_bytes(params: list, name: str) -> int:
    """Bytes of the optimizer's states once it has stepped. They are made at the first step, so the probe, which
    runs before it, never holds them. torch AdamW: two fp32 moments a value and a step count a tensor. bitsandbytes'
    8-bit AdamW (paged or not): two uint8 moments a value, an fp32 absmax per block of 256 for each, and two
    256-entry fp32 code books a tensor; tensors under 4096 values keep two fp32 moments."""
    total = 0
    for p in params:
        n = p.numel()
        if name == "adamw":
            total += 2 * 4 * n + 4
        elif n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK) + 2 * 256 * 4
    return total


def image_feature_bytes(model: ColIntern, processor: ColInternProcessor, step_pages: int) -> int:
    """What gradient caching keeps of a step's image features between its passes: `step_pages` worst-case pages
    (probe_page) x tiles x image tokens x hidden, in the backbone's dtype."""
    tiles = processor.process_pages([probe_page(processor)])["pixel_values"].shape[0]
    per_tile = model.backbone.config.image_seq_length * model.hidden_size * model.backbone.dtype.itemsize
    return step_pages * tiles * per_tile


def probe_headroom(
    params: list, optimizer: str, world: int, device_bytes: int, feature_bytes: int, margin: float
) -> dict:
    """Bytes a real training step holds that the --auto_batch probe does not, by what holds them:
    optimizer states (optimizer_state_bytes), made at the first step;
    DDP's gradient buckets with several processes: a flat fp32 copy of the gradients, 4 bytes a trainable value;
    gradient caching's image features of the whole step (image_feature_bytes; 0 when offloaded or not caching);
    a margin, `margin` x the device's memory, for what no formula here knows: NCCL's lazily made buffers, the
    allocator's fragmentation over batches of varying lengths, CUDA graphs or kernels' workspaces."""
    return {
        "optimizer states": optimizer_state_bytes(params, optimizer),
        "DDP gradient buckets": 4 * sum(p.numel() for p in params) if world > 1 else 0,
        "cached image features": feature_bytes,
        f"margin ({margin:.0%} of the device)": int(margin * device_bytes),
    }


# -----------------------------------------------------------------------------
# Outputs: loss log, args.json, checkpoints


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


class LossLog:
    """training_loss.txt: `# step epoch loss lr`, one line per optimizer step. Lines after `start_step` (left by an
    interrupted run being resumed) are dropped, atomically, before appending."""

    def __init__(self, out_dir: str, start_step: int):
        self.path = os.path.join(out_dir, LOSS_LOG)
        kept = []
        if start_step > 0 and os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [
                    line
                    for line in f
                    if line.strip() and not line.startswith("#") and int(line.split()[0]) <= start_step
                ]
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            f.writelines([LOSS_LOG_HEADER] + kept)
        self.file = open(self.path, "a")

    def write(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.file.write(f"{step} {epoch} {loss:.6f} {lr:.6e}\n")
        self.file.flush()

    def close(self):
        self.file.close()


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a cluster pre-empts a job (SLURM, Kubernetes, torchrun's agent on every rank): handled as Ctrl-C,
    a step snapshot first, then exit 143."""


def raise_terminated(signum, frame):
    raise Terminated


def terminate_as_interrupt():
    """From now on SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread, as SIGINT raises
    KeyboardInterrupt. -> a function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C and SIGTERM during an optimizer update (weights, optimizer and position change together), then
    raise what came (Terminated if a SIGTERM did)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {s: signal.signal(s, lambda signum, _: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending:
        raise Terminated if signal.SIGTERM in pending else KeyboardInterrupt


# -----------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class RunState:
    """Where a run stands. Steps are optimizer steps, counted in this run (steps_run; a warm start begins a new run)
    and in all (step: steps_before, the checkpoint's, + steps_run), which names files and the loss log. Epochs:
    epochs_run of this run are done, and micro-batch batch_in_epoch of the next one is due; epoch is that epoch's
    number in all (1-based, going on from the checkpoint's epochs_before), epochs_done the epochs done in all. A step
    snapshot stores them under its own keys (save_run, resume_snapshot)."""

    run: dict  # run_config: what a step snapshot must share with the run that resumes it
    batches_per_epoch: int
    total_steps: int  # of this run
    steps_run: int = 0
    steps_before: int = 0
    epochs_before: int = 0
    epochs_run: int = 0
    batch_in_epoch: int = 0
    last_saved: str | None = None  # the last checkpoint written (or resumed from)

    @property
    def step(self) -> int:
        return self.steps_before + self.steps_run

    @property
    def epoch(self) -> int:
        return self.epochs_before + self.epochs_run + 1

    @property
    def epochs_done(self) -> int:
        return self.epochs_before + self.epochs_run + self.epoch_ended

    @property
    def epoch_ended(self) -> bool:
        return self.batch_in_epoch >= self.batches_per_epoch


def run_config(args, rows, model: ColIntern, batch_size: int, grad_accum: int, world: int, total_steps: int) -> dict:
    """What a step snapshot must share with the run that resumes it for the continuation to be exact. The model's
    quantisation, attention and Matryoshka prefixes are as loaded (a warm start keeps its checkpoint's)."""
    return {
        "data": rows.fingerprint,
        "global_batch": batch_size * world,
        "grad_accum": grad_accum,
        "seed": args.seed,
        "num_negs": args.num_negs,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "total_steps": total_steps,
        "temperature": args.temperature,
        "optimizer": args.optimizer,
        "quantize": model.quantize,
        "attn_implementation": args.attn_implementation,
        "schedule": SCHEDULE,
        "batch_by": args.batch_by,
        "bidirectional": model.bidirectional,
        # the loss's prefixes: None when it trains the full size alone
        "matryoshka_dims": model.matryoshka_dims if len(model.matryoshka_dims) > 1 else None,
    }


def training_data_lineage(args, rows, ckpt: dict | None) -> list:
    """Every dataset the weights this run saves were trained on, written into each checkpoint's meta (eval.py declares
    it to mteb as training_datasets): --train_hub's name, or the datasets --train_jsonl's pseudo-paths point into (and
    --root for plain image files), plus the lineage of the --resume_ckpt the run starts from."""
    from colintern_data import PSEUDO_PATH

    if args.train_hub:
        sources = {args.train_hub}
    else:
        sources = set()
        for ref in {ref for row in rows.rows for ref in [row["pos"], *row["negs"]]}:
            m = PSEUDO_PATH.match(ref)
            if m and not os.path.isfile(os.path.join(args.root, ref)):  # the order PageResolver resolves in
                sources.add(m["dataset"])
            else:
                sources.add(f"image files under {os.path.abspath(args.root)}")
    if ckpt is not None:
        parent = ckpt["meta"].get("training_data")
        sources.update(
            parent
            if parent is not None
            else [f"unrecorded: the training data of {args.resume_ckpt} (written before lineage was recorded)"]
        )
    return sorted(sources)


def check_same_run(saved: dict, ours: dict, path: str) -> None:
    diffs = [f"{k}: snapshot {saved.get(k)!r}, this run {v!r}" for k, v in ours.items() if saved.get(k) != v]
    if diffs:
        raise UserValueError(
            f"--resume_ckpt {path} is a step snapshot of another run ({'; '.join(diffs)}). A step "
            f"snapshot continues the same run: pass the same flags and data (--max_steps and --epochs "
            f"set the schedule). To start new training from it, resume an epoch checkpoint instead."
        )


def choose_batch_size(args, model, processor, snapshot: dict | None, world: int, say) -> tuple[int, int]:
    """-> (micro-batch per device, micro-batches per step): the flags', or with --auto_batch on CUDA the largest
    micro-batch that fits on every rank, --grad_accum raised by the same factor. A step snapshot keeps its own."""
    batch_size, grad_accum = args.batch_size, args.grad_accum
    if not args.auto_batch:
        return batch_size, grad_accum
    if snapshot:
        batch_size, grad_accum = snapshot["run"]["global_batch"] // world, snapshot["run"]["grad_accum"]
        say(f"--auto_batch: resuming a step snapshot, so its batch {batch_size} x --grad_accum {grad_accum} is kept")
        return batch_size, grad_accum
    if model.device.type != "cuda":
        say(
            f"--auto_batch: CPU has no out-of-memory error to probe (the OS kills the process instead); keeping "
            f"--batch_size {batch_size}"
        )
        return batch_size, grad_accum
    with ranks_agree("probing the batch size", world):  # no rank may be left waiting for one that failed
        model.train()
        caching = grad_accum > 1 or batch_size > 1  # halving the micro-batch turns caching on
        features = (
            0
            if args.offload_image_features or not caching
            else image_feature_bytes(model, processor, batch_size * grad_accum * (1 + args.num_negs))
        )
        headroom = probe_headroom(
            model.trainable_parameters(),
            args.optimizer,
            world,
            torch.cuda.get_device_properties(model.device).total_memory,
            features,
            args.auto_batch_margin,
        )
        keep = sum(headroom.values())
        say(
            f"--auto_batch: keeping {keep / 2**30:.2f} GiB free while probing, for what a step holds that the "
            f"probe does not: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in headroom.items())
        )
        try:
            reserve = torch.empty(keep, dtype=torch.uint8, device=model.device)
        except torch.cuda.OutOfMemoryError:
            reserve = None
        if reserve is None:
            raise UserRuntimeError(
                f"--auto_batch: the {keep / 2**30:.2f} GiB a step needs besides its activations "
                f"do not fit on {model.device}; lower --auto_batch_margin, --batch_size x "
                f"--grad_accum, or pass --offload_image_features"
            )
        found = find_batch_size(
            probe_batch(model, processor, args.num_negs, args.temperature, batch_size * grad_accum, world),
            batch_size,
            say,
        )
        del reserve
    if world > 1:  # every rank steps with the same micro-batch: the smallest that fits anywhere
        t = torch.tensor([found], device=model.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        found = int(t)
    grad_accum *= batch_size // found
    say(
        f"--auto_batch: batch {found} per device fits; --grad_accum {grad_accum} keeps "
        f"{found * grad_accum * world} queries per step"
    )
    return found, grad_accum


def count_steps(args, rows, batch_size: int, grad_accum: int, world: int, say=print) -> tuple[int, int]:
    """-> (micro-batches per epoch, optimizer steps of this run). An epoch ends on a full step (with --batch_by, on
    each group's last full step); the rows left over are said; --max_steps caps."""
    global_batch = batch_size * world
    step_rows = global_batch * grad_accum
    groups = getattr(rows, "groups", None)
    used = rows_per_epoch(len(rows), groups, step_rows)
    batches_per_epoch = used // global_batch
    steps_per_epoch = batches_per_epoch // grad_accum
    within = f" of any --batch_by {args.batch_by} value" if groups is not None else ""
    if steps_per_epoch == 0:
        raise UserValueError(
            f"training data has {len(rows)} rows{within}; one optimizer step needs --batch_size "
            f"{batch_size} x {world} process(es) x --grad_accum {grad_accum} = {step_rows}: lower "
            f"them or add data"
        )
    if groups is not None:
        sizes = collections.Counter(groups)
        say(
            f"--batch_by {args.batch_by}: {len(sizes)} value(s), each step's {step_rows} queries share one; "
            + ", ".join(f"{label} {n}" for label, n in sorted(sizes.items())[:8])
            + (" ..." if len(sizes) > 8 else "")
        )
    if used < len(rows):
        say(
            f"{len(rows) - used} of {len(rows)} rows left out of each epoch: {'each value' if groups else 'the'}'s "
            f"remainder below one step of {step_rows} (the order is reshuffled every epoch)"
        )
    total_steps = steps_per_epoch * args.epochs
    return batches_per_epoch, min(total_steps, args.max_steps) if args.max_steps else total_steps


@dataclasses.dataclass
class Optimization:
    """What an optimizer step touches, built once by train(): the encoder (DDP-wrapped under torchrun), the
    trainable parameters by name, the optimizer, its schedule, the fp16 loss scaler (disabled otherwise), and the
    loss."""

    encoder: nn.Module
    params: dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss: StepLoss

    def state_dict(self) -> dict:
        """What a step snapshot keeps of them to resume exactly (the weights are the checkpoint's own)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }


def resume_snapshot(state: RunState, snapshot: dict, path: str, opt: Optimization) -> None:
    """Continue a step snapshot exactly: the same run (else an error), its optimizer, schedule, loss scale,
    counters and data position."""
    check_same_run(snapshot["run"], state.run, path)
    opt.optimizer.load_state_dict(snapshot["optimizer"])
    opt.scheduler.load_state_dict(snapshot["scheduler"])
    if "scaler" in snapshot:
        opt.scaler.load_state_dict(snapshot["scaler"])
    state.steps_run, state.steps_before, state.epochs_before = (
        snapshot["run_step"],
        snapshot["step_offset"],
        snapshot["epoch_offset"],
    )
    state.epochs_run, state.batch_in_epoch = snapshot["position"]["epoch"], snapshot["position"]["batch"]


def save_run(kind: str, state: RunState, args, rank: int, model: ColIntern, lineage: list, opt: Optimization) -> str:
    """A step snapshot (colintern_heads_step{N}.pt: + optimizer, schedule, loss scale, to resume exactly) or an
    epoch checkpoint (colintern_heads_epoch{E}.pt) -> its path. Rank 0 writes, atomically; the other ranks hold
    identical weights (DDP)."""
    name = f"colintern_heads_step{state.step}.pt" if kind == "step" else f"colintern_heads_epoch{state.epochs_done}.pt"
    path = os.path.join(args.out_dir, name)
    if rank == 0:
        train_state = {
            "kind": kind,
            "run_step": state.steps_run,
            "step_offset": state.steps_before,
            "epoch_offset": state.epochs_before,
            "position": {"epoch": state.epochs_run, "batch": state.batch_in_epoch},
            "run": state.run,
            "args": vars(args),
            "git_commit": git_commit(),
        }
        if kind == "step":
            train_state.update(opt.state_dict())
        save_checkpoint(
            path, model, step=state.step, epoch=state.epochs_done, train_state=train_state, training_data=lineage
        )
    return path


def train_step(
    micro_batches: list, state: RunState, args, opt: Optimization, rank: int, world: int, log: LossLog | None
):
    """One optimizer step: forward and backward of the micro-batches (dropout seeded by the step), the loss averaged
    over ranks, then, Ctrl-C held, the update, the schedule, the counters and the loss log together. A non-finite loss
    or gradient, or an update that leaves a weight non-finite, stops the run before anything is logged or saved;
    fp16 gradients that overflowed make the scaler skip the update, and the schedule stays where it is (as the
    weights). -> (loss, lr, overflowed)."""
    encoder, params, optimizer, scheduler, scaler = opt.encoder, opt.params, opt.optimizer, opt.scheduler, opt.scaler
    seed_step(args.seed, rank, state.step)
    loss = step_forward_backward(encoder, micro_batches, opt.loss, rank, world, scaler.scale)
    if world > 1:
        dist.all_reduce(loss)  # gloo has no AVG
        loss /= world
    with ranks_agree("updating the weights", world):  # no collective from here on: one rank's error stops all
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), float("inf"))
        overflow = scaler.is_enabled() and not torch.isfinite(grad_norm)  # fp16: the scaler skips the step
        if not torch.isfinite(loss) or not (torch.isfinite(grad_norm) or overflow):
            raise UserFloatingPointError(
                f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} at step {state.step + 1} (epoch "
                f"{state.epoch}, micro-batch {state.batch_in_epoch + len(micro_batches)}): stopping without saving. "
                f"Last good checkpoint: {state.last_saved or 'none'}. Lower --lr, raise --temperature, or check the "
                f"data; resume from that checkpoint."
            )
        lr = optimizer.param_groups[0]["lr"]
        with interrupts_deferred():
            scaler.step(optimizer)
            bad = first_non_finite(params)
            if bad is not None:
                raise UserFloatingPointError(
                    f"step {state.step + 1} made {bad} non-finite (--lr {args.lr} on finite gradients): stopping "
                    f"without saving. Last good checkpoint: {state.last_saved or 'none'}. Lower --lr; resume from "
                    f"that checkpoint."
                )
            scaler.update()
            if not overflow:  # a skipped step leaves the schedule where it is (as the weights)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.steps_run += 1
            state.batch_in_epoch += len(micro_batches)
            if log:
                log.write(state.step, state.epoch, float(loss), lr)
    return loss, lr, overflow


def ddp_encoder(model: ColIntern, world: int) -> nn.Module:
    """The training forward; with several processes under DDP, which all-reduces the gradients in backward."""
    encoder = QueryPageEncoder(model)
    if world == 1:
        return encoder
    return nn.parallel.DistributedDataParallel(
        encoder, device_ids=[model.device.index] if model.device.type == "cuda" else None, broadcast_buffers=False
    )


RUN_FILES = ("args.json", LOSS_LOG)  # with colintern_heads_*.pt: what a run writes into its --out_dir
FLAGS_NOT_OF_THE_RUN = ("resume_ckpt", "overwrite", "out_dir")  # may differ when the same run starts again there


def check_out_dir_is_this_runs(args) -> None:
    """Refuse an --out_dir that holds another run's files, so that two runs never mix in one folder (its step
    snapshots beside the other's epoch checkpoint and log). This run's own folder is one its --resume_ckpt is in (a
    resume, or the original recipe's epoch-2 warm start from epoch 1's folder), or one whose args.json holds these
    very flags (the same command again, say after a crash before its first checkpoint); --overwrite allows any."""
    if args.overwrite or not os.path.isdir(args.out_dir):
        return
    theirs = [f for f in RUN_FILES if os.path.isfile(os.path.join(args.out_dir, f))]
    theirs += sorted(f for f in os.listdir(args.out_dir) if f.startswith("colintern_heads_") and f.endswith(".pt"))
    if not theirs:
        return
    if args.resume_ckpt and os.path.dirname(os.path.abspath(args.resume_ckpt)) == os.path.abspath(args.out_dir):
        return
    try:
        with open(os.path.join(args.out_dir, "args.json")) as f:
            given = json.load(f).get("flags_given")
    except (OSError, ValueError):
        given = None
    ours = {k: v for k, v in vars(args).items() if k not in FLAGS_NOT_OF_THE_RUN}
    if isinstance(given, dict) and {k: given.get(k) for k in ours} == ours:
        return
    raise UserFileExistsError(
        f"--out_dir {args.out_dir} holds another run's files ({', '.join(theirs[:4])}"
        f"{' ...' if len(theirs) > 4 else ''}): pass a new --out_dir, --resume_ckpt one of its "
        f"checkpoints to continue that run, or --overwrite to write over them"
    )


def write_args_json(
    args, model: ColIntern, world: int, device_map, batch_size: int, grad_accum: int, total_steps: int
) -> None:
    """args.json: the settings this run used (a warm start's model, shape and LoRA come from its checkpoint, not
    from flags left unset), the flags as given (`flags_given`), and how it ran."""
    lora = dataclasses.asdict(model.lora) if model.lora else {}
    effective = {
        "model_id": model.model_id,
        "proj_dim": model.proj_dim,
        "max_tiles": model.max_tiles,
        "lora": model.lora is not None,
        "lora_r": lora.get("r"),
        "lora_alpha": lora.get("alpha"),
        "lora_dropout": lora.get("dropout"),
        "quantize": model.quantize,
        "dtype": dtype_name(model.backbone.dtype),
        "attn_implementation": model.attn_implementation,
        "bidirectional": model.bidirectional,
        "matryoshka_dims": model.matryoshka_dims,
    }
    write_json(
        os.path.join(args.out_dir, "args.json"),
        {
            **vars(args),
            **effective,
            "flags_given": vars(args),
            "git_commit": git_commit(),
            "world_size": world,
            "device_map": str(device_map),
            "effective_batch_size": batch_size,
            "effective_grad_accum": grad_accum,
            "total_steps": total_steps,
            "argv": sys.argv,
        },
    )


def epoch_loader(
    rows,
    processor: ColInternProcessor,
    state: RunState,
    args,
    batch_size: int,
    rank: int,
    world: int,
    device: torch.device,
) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from the data position to the end of its epoch, decoded by the DataLoader workers."""
    sampler = EpochBatches(
        len(rows),
        state.epochs_run,
        args.seed,
        batch_size,
        rank,
        world,
        state.batches_per_epoch,
        start=state.batch_in_epoch,
        groups=getattr(rows, "groups", None),
        step_rows=batch_size * world * state.run["grad_accum"],
    )
    return torch.utils.data.DataLoader(
        rows,
        batch_sampler=sampler,
        collate_fn=Collate(processor),
        num_workers=args.num_workers,
        prefetch_factor=args.prefetch_factor if args.num_workers else None,
        pin_memory=device.type == "cuda",
    )


def main(args):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers tokenize; the forked Rust pool would warn
    with distributed_run(args.device_map, "--device_map", allow_auto=True) as run:
        return train(args, run.rank, run.world, run.device, run.say)


def load_inputs(args, device_map, say):
    """The run's inputs, checked: its --out_dir, the checkpoint it resumes, the training rows and the model ->
    (checkpoint or None, step snapshot or None, rows, model, processor)."""
    check_out_dir_is_this_runs(args)
    check_output(args.out_dir, "--out_dir", "folder")
    ckpt = load_checkpoint(args.resume_ckpt) if args.resume_ckpt else None
    train_state = (ckpt or {}).get("train_state") or {}
    snapshot = train_state if train_state.get("kind") == "step" else None  # resumed exactly; else a warm start
    rows = load_training_rows(args)
    say(f"training data: {rows.label}")
    if getattr(rows, "short", 0):
        say(
            f"{rows.short} row(s) have fewer than --num_negs {args.num_negs} negatives: topped up with random "
            f"other pages"
        )

    model, processor = build_model(args, ckpt, device_map, say)
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    say(
        f"model {model.model_id}: {n_trainable / 1e6:.3f}M trainable parameters (heads"
        f"{' + LoRA' if model.lora else ''}), backbone dtype {model.backbone.dtype}"
        f"{'' if model.quantize == 'none' else f' (language model {model.quantize})'}, device {model.device}"
    )
    if args.gradient_checkpointing:
        if model.lora:
            model.enable_gradient_checkpointing()
        else:
            say(
                "--gradient_checkpointing: no effect without LoRA (nothing is back-propagated through the "
                "frozen backbone, so it keeps no activations)"
            )
    if args.compile_heads:
        say(
            "--compile_heads: accepted for the original ColIntern commands, and does nothing: the heads are one "
            "linear layer and a normalisation, a negligible part of a step"
        )
    return ckpt, snapshot, rows, model, processor


def train(args, rank, world, device_map, say):
    with ranks_agree("loading the data and the model", world):
        ckpt, snapshot, rows, model, processor = load_inputs(args, device_map, say)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # trainable_parameters' order
    batch_size, grad_accum = choose_batch_size(args, model, processor, snapshot, world, say)
    batches_per_epoch, total_steps = count_steps(args, rows, batch_size, grad_accum, world, say)
    note = None if snapshot else warmup_note(args.warmup_steps, total_steps, args.lr)
    if note:
        say(note)
    state = RunState(
        run_config(args, rows, model, batch_size, grad_accum, world, total_steps),
        batches_per_epoch,
        total_steps,
        last_saved=args.resume_ckpt,
    )
    lineage = training_data_lineage(args, rows, ckpt)
    say(f"checkpoints record the training data: {', '.join(lineage)}")

    optimizer = make_optimizer(args.optimizer, list(params.values()), args.lr, say)
    opt = Optimization(
        encoder=ddp_encoder(model, world),
        params=params,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, total_steps)),
        # fp16 backbone: dynamic loss scaling, so that small activation gradients do not underflow fp16's range
        # (bf16 has fp32's range and needs none); parameters and their gradients are fp32 either way.
        scaler=torch.amp.GradScaler(model.device.type, enabled=model.backbone.dtype == torch.float16),
        loss=StepLoss(args.temperature, state.run["matryoshka_dims"], args.offload_image_features),
    )
    if snapshot:
        resume_snapshot(state, snapshot, args.resume_ckpt, opt)
        say(
            f"resuming step snapshot {args.resume_ckpt} exactly: step {state.step}, epoch {state.epoch}, "
            f"micro-batch {state.batch_in_epoch} of {batches_per_epoch}"
        )
    elif ckpt is not None:
        state.steps_before, state.epochs_before = ckpt["meta"]["step"], ckpt["meta"]["epoch"]
        say(
            f"warm start from {args.resume_ckpt} (epoch {state.epochs_before}, step {state.steps_before}): heads"
            f"{' + LoRA' if model.lora else ''} loaded, fresh optimizer and schedule; epochs continue at "
            f"{state.epoch}"
        )

    log = None
    with ranks_agree("writing args.json and the loss log", world):
        if rank == 0:
            write_args_json(args, model, world, device_map, batch_size, grad_accum, total_steps)
            log = LossLog(args.out_dir, state.step)
    save_here = functools.partial(
        save_run,
        args=args,
        rank=rank,
        model=model,
        lineage=lineage,
        opt=opt,
    )

    def save(kind, state):  # -> path; rank 0 writes, and a failed write stops every rank
        with ranks_agree(f"writing a {kind} checkpoint", world):
            return save_here(kind, state)

    model.train()
    bar = progress_bar(
        total=total_steps, initial=state.steps_run, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True
    )
    started, steps_here = time.perf_counter(), 0
    restore_sigterm = terminate_as_interrupt()
    try:
        while state.steps_run < total_steps and state.epochs_run < args.epochs:
            if state.epoch_ended:
                state.epochs_run, state.batch_in_epoch = state.epochs_run + 1, 0
                continue
            batches = iter(epoch_loader(rows, processor, state, args, batch_size, rank, world, model.device))
            while True:
                with ranks_agree("loading a batch", world):  # a rank's bad page stops every rank, with its error
                    micro_batches = list(itertools.islice(batches, grad_accum))
                if len(micro_batches) < grad_accum:  # the epoch's end (it ends on a whole step, on every rank)
                    break
                loss, lr, overflow = train_step(micro_batches, state, args, opt, rank, world, log)
                steps_here += 1
                if overflow:
                    say(
                        f"step {state.step}: fp16 gradients overflowed at loss scale {opt.scaler.get_scale() * 2:g}; "
                        f"step skipped, scale lowered"
                    )
                rate = steps_here * batch_size * world * grad_accum / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                bar.update(1)
                if args.save_every and state.steps_run % args.save_every == 0:
                    state.last_saved = save("step", state)
                if state.steps_run >= total_steps:
                    break
            if state.epoch_ended:
                state.last_saved = save("epoch", state)
                say(f"epoch {state.epoch} done: {state.last_saved}")
        if (
            state.steps_run == total_steps
            and not state.epoch_ended
            and not (args.save_every and state.steps_run % args.save_every == 0)
        ):
            state.last_saved = save("step", state)  # --max_steps stopped mid-epoch: keep it resumable
    except KeyboardInterrupt as e:
        bar.close()
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if state.steps_run > 0 or ckpt is not None:
            path = save_here("step", state)  # no agreement: the ranks may have been stopped at different places
            if rank == 0:
                print(
                    f"{what}: wrote step snapshot {path} (step {state.step}); resume with --resume_ckpt "
                    f"{path} and the same flags",
                    file=sys.stderr,
                )
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
    finally:
        restore_sigterm()
        bar.close()
        if log:
            log.close()
    say(f"done at step {state.step} ({steps_here} in this invocation); last checkpoint {state.last_saved}")
    return state.last_saved


if __name__ == "__main__":
    run_cli(main, parse_args())
