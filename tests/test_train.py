"""train.py through its CLI entry (main(parse_args([...]))) on the tiny model and rendered keyword pages."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import ROOT, launch, query
from PIL import Image

import colintern_loss as cl
import train
from colintern_checkpoint import LORA_KEY_ADAPTER_NAME, load_checkpoint
from colintern_data import PSEUDO_PATH, pseudo_path
from colintern_model import ColIntern, LoraSettings, trainable_state_dict
from colintern_scoring import maxsim_scores
from make_synthetic_data import WORDS, render_keyword_page

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_train(*flags):
    return train.main(train.parse_args([str(f) for f in flags]))


def save_hub_folder(folder, words, variant=0, size=(224, 224)):
    """A local dataset folder in the hub layout (data/train-*.parquet) with colpali_train_set's columns."""
    ds = datasets.Dataset.from_dict(
        {
            "query": [query(w) for w in words],
            "image": [render_keyword_page(w, size=size, variant=variant) for w in words],
        }
    )
    ds = ds.cast_column("image", datasets.Image())
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    ds.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    return str(folder)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """16 keyword pages as files under root/, the same pages as a hub-layout folder whose path has slashes, and a
    JSONL mixing file paths and pseudo-paths, each row with 3 negatives."""
    root = tmp_path_factory.mktemp("pages")
    words = WORDS[:16]
    os.makedirs(root / "img")
    for w in words:
        render_keyword_page(w).save(root / "img" / f"{w}.png")
    hub = save_hub_folder(root / "data" / "kw-pages", words)
    rows = []
    for i, w in enumerate(words):
        negs = [
            f"img/{words[(i + 1) % 16]}.png",
            pseudo_path(hub, "train", (i + 2) % 16),
            pseudo_path(hub, "train", (i + 3) % 16),
        ]
        pos = f"img/{w}.png" if i % 2 else pseudo_path(hub, "train", i)
        rows.append({"query": query(w), "pos": pos, "negs": negs})
    return {"root": str(root), "hub": hub, "words": words, "jsonl": write_jsonl(root / "triples.jsonl", rows)}


def base_flags(tiny_model_dir, pages, out_dir, **extra):
    flags = {
        "--model_id": tiny_model_dir,
        "--train_jsonl": pages["jsonl"],
        "--root": pages["root"],
        "--out_dir": out_dir,
        "--batch_size": 4,
        "--num_negs": 1,
        "--lr": 2e-3,
        "--warmup_steps": 2,
        "--optimizer": "adamw",
        "--num_workers": 0,
        "--save_every": 0,
        "--temperature": 0.05,
    }
    flags.update(extra)
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(k)
        elif v is not None and v is not False:
            out += [k, v]
    return out


def read_loss_log(out_dir):
    with open(os.path.join(out_dir, "training_loss.txt")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "# step epoch loss lr"
    return [(int(s), int(e), float(loss), float(lr)) for s, e, loss, lr in (line.split() for line in lines[1:])]


def trainable(path):
    ckpt = load_checkpoint(path)
    return {**{"heads." + k: v for k, v in ckpt["heads"].items()}, **{"lora." + k: v for k, v in ckpt["lora"].items()}}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------
# flags, data


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = (
        "model_id train_hub train_jsonl root out_dir batch_size grad_accum epochs lr device_map lora lora_r "
        "lora_alpha lora_dropout optimizer resume_ckpt num_workers prefetch_factor save_every compile_heads "
        "proj_dim max_tiles temperature warmup_steps seed dtype gradient_checkpointing num_negs max_steps "
        "auto_batch split"
    ).split()
    for flag in flags:
        assert f"--{flag} " in text or f"--{flag}\n" in text, flag
    for name in train.OPTIMIZERS:
        assert name in text


def test_jsonl_pseudo_paths_resolve_to_dataset_rows(pages):
    rows = train.JsonlTriples(pages["jsonl"], pages["root"], num_negs=2, seed=0)
    hub = datasets.load_dataset(pages["hub"], split="train")
    with open(pages["jsonl"]) as f:
        lines = [json.loads(line) for line in f]
    for i in (0, 3, 6):
        item = rows[(0, i)]
        assert item["query"] == lines[i]["query"]
        expected = hub[i]["image"] if i % 2 == 0 else Image.open(os.path.join(pages["root"], lines[i]["pos"]))
        assert item["pos"].tobytes() == expected.convert("RGB").tobytes()
        # the drawn negatives are 2 of the row's 3, each the right image (a file or a dataset row)
        drawn = rows.negatives(0, i)
        assert len(drawn) == 2 and set(drawn) <= set(lines[i]["negs"])
        for ref, image in zip(drawn, item["negs"]):
            m = PSEUDO_PATH.match(ref)
            source = hub[int(m["index"])]["image"] if m else Image.open(os.path.join(pages["root"], ref))
            assert image.tobytes() == source.convert("RGB").tobytes()
    # deterministic per (seed, epoch, row), and not the same draw every epoch
    assert rows.negatives(0, 5) == train.JsonlTriples(pages["jsonl"], pages["root"], 2, 0).negatives(0, 5)
    assert len({tuple(rows.negatives(e, 5)) for e in range(8)}) > 1


def test_rows_short_of_negatives_are_topped_up(tmp_path, pages):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"query": "a", "pos": "img/apple.png", "negs": []},
            {"query": "b", "pos": "img/river.png", "negs": ["img/stone.png"]},
            {"query": "c", "pos": "img/stone.png"},
        ],
    )
    rows = train.JsonlTriples(path, pages["root"], num_negs=2, seed=0)
    assert rows.short == 3
    for i, own in enumerate(["img/apple.png", "img/river.png", "img/stone.png"]):
        negs = rows.negatives(0, i)
        assert len(negs) == 2 and own not in negs
    assert "img/stone.png" in rows.negatives(0, 1)


def test_epoch_batches_split_one_global_order_across_ranks():
    single = list(train.EpochBatches(40, epoch=3, seed=7, batch_size=8, rank=0, world=1, n_batches=5))
    ranks = [list(train.EpochBatches(40, epoch=3, seed=7, batch_size=4, rank=r, world=2, n_batches=5)) for r in (0, 1)]
    for b in range(5):
        assert single[b] == ranks[0][b] + ranks[1][b]
    assert sorted(i for batch in single for _, i in batch) == list(range(40))
    resumed = list(train.EpochBatches(40, epoch=3, seed=7, batch_size=8, rank=0, world=1, n_batches=5, start=3))
    assert resumed == single[3:]
    assert single != list(train.EpochBatches(40, epoch=4, seed=7, batch_size=8, rank=0, world=1, n_batches=5))


def test_batch_by_puts_each_steps_rows_in_one_group_seeded_and_resumable():
    """--batch_by: 3 groups of 11, 6 and 3 rows, steps of 4 rows (2 per micro-batch x 2 ranks, or 4 in one process):
    every step's rows share a group; each row at most once; each group's remainder (3 + 2 + 3 rows) left out; the
    same order for the same (seed, epoch), another for the next epoch; ranks split one order as one process sees it,
    and a resumed sampler continues it."""
    groups = ["a"] * 11 + ["b"] * 6 + ["c"] * 3
    order = train.epoch_order(20, epoch=2, seed=5, groups=groups, step_rows=4)
    assert len(order) == train.rows_per_epoch(20, groups, 4) == 12 and len(set(order)) == 12
    steps = [order[k : k + 4] for k in range(0, 12, 4)]
    assert all(len({groups[i] for i in step}) == 1 for step in steps)
    assert sorted(groups[step[0]] for step in steps) == ["a", "a", "b"]
    assert order == train.epoch_order(20, epoch=2, seed=5, groups=groups, step_rows=4)
    assert order != train.epoch_order(20, epoch=3, seed=5, groups=groups, step_rows=4)
    kw = dict(epoch=2, seed=5, n_batches=6, groups=groups, step_rows=4)
    single = list(train.EpochBatches(20, batch_size=2, rank=0, world=1, **kw))  # 2 micro-batches of 2 per step
    ranks = [list(train.EpochBatches(20, batch_size=1, rank=r, world=2, **kw)) for r in (0, 1)]
    assert [[i for _, i in b] for b in single] == [order[k : k + 2] for k in range(0, 12, 2)]
    assert all(single[b] == ranks[0][b] + ranks[1][b] for b in range(6))
    assert list(train.EpochBatches(20, batch_size=2, rank=0, world=1, start=3, **kw)) == single[3:]
    assert train.rows_per_epoch(20, None, 4) == 20 and train.rows_per_epoch(22, None, 4) == 20


def test_training_batched_by_a_field_counts_what_it_leaves_out_and_resumes_exactly(
    tiny_model_dir, pages, tmp_path, capsys
):
    """A JSONL whose rows carry a `source` (9 and 7 rows), steps of 4 queries: 2 + 1 steps an epoch, 4 rows left out
    and said; a step snapshot resumes exactly, and with another --batch_by it is refused. A missing field or column
    is one line."""
    with open(pages["jsonl"]) as f:
        rows = [json.loads(line) for line in f]
    jsonl = write_jsonl(tmp_path / "sourced.jsonl", [dict(r, source="a" if i < 9 else "b") for i, r in enumerate(rows)])
    out = tmp_path / "run"
    flags = base_flags(
        tiny_model_dir,
        pages,
        out,
        **{
            "--train_jsonl": jsonl,
            "--batch_size": 2,
            "--grad_accum": 2,
            "--batch_by": "source",
            "--save_every": 2,
            "--epochs": 1,
        },
    )
    run_train(*flags)
    said = capsys.readouterr().out
    assert "--batch_by source: 2 value(s), each step's 4 queries share one; a 9, b 7" in said
    assert "4 of 16 rows left out of each epoch" in said
    assert [s for s, *_ in read_loss_log(out)] == [1, 2, 3]
    resumed = tmp_path / "resumed"
    run_train(*[f if f != out else resumed for f in flags], "--resume_ckpt", out / "colintern_heads_step2.pt")
    assert_same_weights(
        trainable(str(out / "colintern_heads_epoch1.pt")), trainable(str(resumed / "colintern_heads_epoch1.pt"))
    )
    with pytest.raises(ValueError, match="batch_by"):
        run_train(
            *[f if f != "source" else "query" for f in flags],
            "--resume_ckpt",
            out / "colintern_heads_step2.pt",
            "--overwrite",
        )
    with pytest.raises(ValueError, match=f"--batch_by topic: {re.escape(jsonl)} line 1 has no 'topic' field"):
        run_train(*[f if f != "source" else "topic" for f in flags], "--overwrite")
    with pytest.raises(
        ValueError, match="--batch_by topic: --train_hub .* has no such column \\(it has query, image\\)"
    ):
        run_train(
            *base_flags(
                tiny_model_dir,
                pages,
                tmp_path / "hub",
                **{"--train_jsonl": None, "--num_negs": None, "--train_hub": pages["hub"], "--batch_by": "topic"},
            )
        )


def test_bidirectional_training_is_recorded_and_kept_by_a_warm_start(tiny_model_dir, pages, tmp_path):
    """--bidirectional reaches the checkpoint (meta, run config) and args.json; a warm start from it without the flag
    keeps it (the model is never encoded the other way)."""
    out = tmp_path / "both"
    run_train(*base_flags(tiny_model_dir, pages, out, **{"--bidirectional": True, "--batch_size": 8, "--epochs": 1}))
    first = load_checkpoint(str(out / "colintern_heads_epoch1.pt"))
    assert first["meta"]["bidirectional"] and first["train_state"]["run"]["bidirectional"]
    assert json.load(open(out / "args.json"))["bidirectional"] is True
    warm = tmp_path / "warm"
    run_train(
        *base_flags(
            tiny_model_dir,
            pages,
            warm,
            **{"--max_steps": 1, "--batch_size": 8, "--resume_ckpt": out / "colintern_heads_epoch1.pt"},
        )
    )
    assert load_checkpoint(str(warm / "colintern_heads_step3.pt"))["meta"]["bidirectional"]


def test_matryoshka_training_records_its_prefixes(tiny_model_dir, pages, tmp_path, capsys):
    """--matryoshka_dims 8 with --proj_dim 16: the loss sums the prefixes 16 and 8 (an untrained model's loss is
    near ln(candidates) at each, so the first step's is near twice that), the checkpoint and run config record them;
    sizes that are no prefix of the heads, or not numbers, are one line."""
    out = tmp_path / "mrl"
    run_train(*base_flags(tiny_model_dir, pages, out, **{"--proj_dim": 16, "--matryoshka_dims": "8", "--max_steps": 1}))
    ckpt = load_checkpoint(str(out / "colintern_heads_step1.pt"))
    assert ckpt["meta"]["matryoshka_dims"] == [16, 8] and ckpt["train_state"]["run"]["matryoshka_dims"] == [16, 8]
    candidates = 4 * 2  # batch 4, each with one hard negative
    assert 1.5 * math.log(candidates) < read_loss_log(out)[0][2] < 2.5 * math.log(candidates)
    with pytest.raises(ValueError, match="must lie in 1..16"):
        run_train(
            *base_flags(tiny_model_dir, pages, tmp_path / "big", **{"--proj_dim": 16, "--matryoshka_dims": "32,16"})
        )
    with pytest.raises(SystemExit):
        train.parse_args(
            [str(f) for f in base_flags(tiny_model_dir, pages, tmp_path / "x", **{"--matryoshka_dims": "16,x"})]
        )
    assert "--matryoshka_dims: expected sizes above 0 separated by commas" in capsys.readouterr().err


def test_warmup_cosine_schedule():
    f = train.warmup_cosine(warmup_steps=4, total_steps=14)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert f(13) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))  # the last step, as --help says


def test_a_warmup_that_takes_most_of_a_short_run_is_said():
    """4 steps under the default 100 warmup steps peak at 4 / 101 of --lr, said in one line; 2 of 14 are not."""
    note = train.warmup_note(100, 4, 1e-3)
    assert note == (
        "--warmup_steps 100 is 2500% of this run's 4 steps: the lr peaks at 3.96e-05 (4% of --lr 0.001); "
        "lower --warmup_steps for a short run"
    )
    assert train.warmup_note(2, 14, 1e-3) is None and train.warmup_note(3, 14, 1e-3) is not None


# -----------------------------------------------------------------------------
# training, outputs


def test_jsonl_with_hard_negatives_loss_falls(tiny_model_dir, pages, tmp_path):
    """Overfit 8 rows (one batch of 8 queries, 8 positives + 8 hard negatives per step) for 25 steps."""
    with open(pages["jsonl"]) as f:
        jsonl = write_jsonl(tmp_path / "eight.jsonl", [json.loads(line) for line in f][:8])
    out = tmp_path / "out"
    run_train(
        *base_flags(
            tiny_model_dir,
            pages,
            out,
            **{
                "--train_jsonl": jsonl,
                "--batch_size": 8,
                "--epochs": 25,
                "--warmup_steps": 4,
                "--lora": True,
                "--lora_r": 8,
                "--lora_alpha": 8,
                "--lora_dropout": 0.0,
                "--save_every": 10,
            },
        )
    )
    log = read_loss_log(out)
    assert [(s, e) for s, e, *_ in log] == [(i, i) for i in range(1, 26)]  # one step per epoch
    # 16 candidate pages per query: an untrained model is near ln(16) = 2.77
    first, last = sum(x[2] for x in log[:3]) / 3, sum(x[2] for x in log[-3:]) / 3
    assert first > 0.8 * math.log(16) and last < 0.5 * first, (first, last)
    lrs = [x[3] for x in log]
    assert lrs[:4] == pytest.approx([2e-3 * k / 5 for k in range(1, 5)]) and max(lrs) == pytest.approx(2e-3)
    assert lrs[-1] < 2e-5
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == sorted(
        [f"colintern_heads_epoch{e}.pt" for e in range(1, 26)]
        + ["colintern_heads_step10.pt", "colintern_heads_step20.pt"]
    )
    saved = json.load(open(out / "args.json"))
    assert saved["train_jsonl"] == jsonl and saved["num_negs"] == 1 and saved["git_commit"]
    ckpt = load_checkpoint(str(out / "colintern_heads_epoch25.pt"))
    assert ckpt["meta"]["epoch"] == 25 and ckpt["meta"]["step"] == 25 and "optimizer" not in ckpt["train_state"]
    snapshot = load_checkpoint(str(out / "colintern_heads_step20.pt"))
    assert snapshot["meta"]["step"] == 20 and {"optimizer", "scheduler"} <= snapshot["train_state"].keys()


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, pages, tmp_path_factory):
    """8 steps over 2 epochs with everything that could break exactness on: 2 micro-batches per step, a DataLoader
    worker, LoRA dropout, bitsandbytes 8-bit AdamW, hard negatives; snapshots every 3 steps."""
    out = tmp_path_factory.mktemp("straight")
    flags = [
        str(f)
        for f in base_flags(
            tiny_model_dir,
            pages,
            out,
            **{
                "--batch_size": 2,
                "--grad_accum": 2,
                "--epochs": 2,
                "--num_workers": 1,
                "--lora": True,
                "--lora_r": 4,
                "--lora_dropout": 0.2,
                "--optimizer": "adamw_8bit",
                "--save_every": 3,
                "--num_negs": 2,
            },
        )
    ]
    run_train(*flags)
    return {"out": out, "flags": flags}


def test_resume_step_snapshot_equals_straight_run(straight_run, tmp_path):
    out = straight_run["out"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == [
        "colintern_heads_epoch1.pt",
        "colintern_heads_epoch2.pt",
        "colintern_heads_step3.pt",
        "colintern_heads_step6.pt",
    ]
    snapshot = load_checkpoint(str(out / "colintern_heads_step3.pt"))
    assert snapshot["train_state"]["position"] == {"epoch": 0, "batch": 6}
    resumed = tmp_path / "resumed"
    flags = [f if f != str(out) else str(resumed) for f in straight_run["flags"]]
    run_train(*flags, "--resume_ckpt", out / "colintern_heads_step3.pt")
    assert_same_weights(
        trainable(str(out / "colintern_heads_epoch2.pt")), trainable(str(resumed / "colintern_heads_epoch2.pt"))
    )
    assert read_loss_log(resumed) == read_loss_log(out)[3:]


@pytest.mark.parametrize(
    "sig, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")]
)
def test_ctrl_c_writes_snapshot_and_resuming_it_is_exact(straight_run, tmp_path, monkeypatch, capsys, sig, code, said):
    """Ctrl-C, or SIGTERM as a cluster pre-empts a job, delivered for real to this process at step 5: step 4's
    snapshot, and resuming it gives the straight run's weights and log."""
    out = tmp_path / "interrupted"
    flags = [f if f != str(straight_run["out"]) else str(out) for f in straight_run["flags"]]
    calls = {"n": 0}
    real_loss = cl.contrastive_loss

    def interrupted_loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5's loss (epoch 2; one loss per step): step 4's state must be what is saved
            os.kill(os.getpid(), sig)
        return real_loss(*a, **k)

    monkeypatch.setattr(cl, "contrastive_loss", interrupted_loss)
    with pytest.raises(SystemExit) as exit_info:
        run_train(*flags)
    assert exit_info.value.code == code
    assert f"{said}: wrote step snapshot" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    snapshot = load_checkpoint(str(out / "colintern_heads_step4.pt"))
    assert snapshot["train_state"]["position"] == {"epoch": 1, "batch": 0}
    assert [s for s, *_ in read_loss_log(out)] == [1, 2, 3, 4]
    monkeypatch.setattr(cl, "contrastive_loss", real_loss)
    run_train(*flags, "--resume_ckpt", out / "colintern_heads_step4.pt")
    assert_same_weights(
        trainable(str(straight_run["out"] / "colintern_heads_epoch2.pt")),
        trainable(str(out / "colintern_heads_epoch2.pt")),
    )
    assert read_loss_log(out) == read_loss_log(straight_run["out"])


def test_sigterm_during_an_update_is_held_until_it_is_whole(monkeypatch):
    """A SIGTERM that arrives while weights, optimizer and position change waits for them all, then stops the run
    as a pre-emption (Terminated), as Ctrl-C does."""
    done = []
    with pytest.raises(train.Terminated):
        with train.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("update finished")
    assert done == ["update finished"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_warm_start_from_epoch_checkpoint_on_new_data(straight_run, tiny_model_dir, pages, tmp_path, capsys):
    epoch2 = straight_run["out"] / "colintern_heads_epoch2.pt"
    mined = write_jsonl(
        tmp_path / "mined.jsonl",
        [
            {"query": query(w), "pos": f"img/{w}.png", "negs": [f"img/{pages['words'][i - 1]}.png"]}
            for i, w in enumerate(pages["words"])
        ],
    )
    out = tmp_path / "e3"
    # no --lora flag: the checkpoint's LoRA layout is kept
    run_train(
        "--model_id",
        tiny_model_dir,
        "--train_jsonl",
        mined,
        "--root",
        pages["root"],
        "--out_dir",
        out,
        "--resume_ckpt",
        epoch2,
        "--batch_size",
        8,
        "--optimizer",
        "adamw",
        "--num_workers",
        0,
        "--epochs",
        1,
        "--lr",
        1e-3,
    )
    text = capsys.readouterr().out
    assert "warm start" in text and "fresh optimizer" in text
    ckpt = load_checkpoint(str(out / "colintern_heads_epoch3.pt"))
    assert ckpt["meta"]["epoch"] == 3 and ckpt["meta"]["step"] == 8 + 2
    assert ckpt["meta"]["lora"]["r"] == 4 and ckpt["lora"].keys() == load_checkpoint(str(epoch2))["lora"].keys()
    assert [(s, e) for s, e, *_ in read_loss_log(out)] == [(9, 3), (10, 3)]
    # the warm start began at the checkpoint's weights: one step at a tiny lr stays close to them
    before, after = trainable(str(epoch2)), trainable(str(out / "colintern_heads_epoch3.pt"))
    assert all((before[k] - after[k]).abs().max() < 2 * 2e-3 for k in before)
    # args.json holds what the run used (the checkpoint's model and LoRA), the flags as given beside them
    used = json.load(open(out / "args.json"))
    assert (used["lora"], used["lora_r"], used["proj_dim"]) == (True, 4, ckpt["meta"]["proj_dim"])
    assert used["flags_given"]["lora"] is False and used["flags_given"]["lora_r"] is None
    assert used["flags_given"]["proj_dim"] is None and used["model_id"] == tiny_model_dir


def test_an_out_dir_of_another_run_is_refused_unless_it_continues_there(straight_run, pages, tmp_path, capsys):
    """A run into a folder holding another run's files is refused before anything is written, and the folder is left
    as it was; the same flags again, a --resume_ckpt from that folder (the original recipe's epoch-2 warm start into
    epoch 1's folder) and --overwrite are let through."""
    other = tmp_path / "other"
    shutil.copytree(straight_run["out"], other)
    before = {f: (other / f).read_bytes() for f in os.listdir(other)}
    flags = [f if f != str(straight_run["out"]) else str(other) for f in straight_run["flags"]]
    flags[flags.index("--lr") + 1] = "1e-3"  # another run: another learning rate
    with pytest.raises(
        FileExistsError,
        match=rf"--out_dir {re.escape(str(other))} holds another run's files "
        rf"\(args.json, training_loss.txt, colintern_heads_epoch1.pt, "
        rf"colintern_heads_epoch2.pt ...\): pass a new --out_dir",
    ):
        run_train(*flags, "--max_steps", 1)
    assert {f: (other / f).read_bytes() for f in os.listdir(other)} == before
    args = train.parse_args([*flags, "--resume_ckpt", str(other / "colintern_heads_epoch1.pt")])
    train.check_out_dir_is_this_runs(args)  # continuing from a checkpoint there
    train.check_out_dir_is_this_runs(train.parse_args([*flags, "--overwrite"]))
    same = [f if f != str(straight_run["out"]) else str(other) for f in straight_run["flags"]]
    train.check_out_dir_is_this_runs(train.parse_args(same))  # the same command again


def test_checkpoints_record_training_data_lineage(tiny_model_dir, pages, tmp_path):
    # epoch 1 on a local copy of colpali_train_set, epoch 2 on a JSONL mined from it, warm-started from epoch 1
    hub = save_hub_folder(tmp_path / "colpali_train_set", WORDS[:8])
    flags = [
        "--model_id",
        tiny_model_dir,
        "--batch_size",
        4,
        "--optimizer",
        "adamw",
        "--num_workers",
        0,
        "--save_every",
        0,
        "--warmup_steps",
        1,
    ]
    run_train(*flags, "--train_hub", hub, "--out_dir", tmp_path / "e1")
    epoch1 = str(tmp_path / "e1" / "colintern_heads_epoch1.pt")
    assert load_checkpoint(epoch1)["meta"]["training_data"] == [hub]
    mined = write_jsonl(
        tmp_path / "mined.jsonl",
        [
            {"query": query(w), "pos": pseudo_path(hub, "train", i), "negs": [pseudo_path(hub, "train", (i + 1) % 8)]}
            for i, w in enumerate(WORDS[:8])
        ],
    )
    run_train(*flags, "--train_jsonl", mined, "--num_negs", 1, "--resume_ckpt", epoch1, "--out_dir", tmp_path / "e2")
    epoch2 = str(tmp_path / "e2" / "colintern_heads_epoch2.pt")
    assert load_checkpoint(epoch2)["meta"]["training_data"] == [hub]

    # eval.py then declares it trained on colpali_train_set, not zero-shot
    from mteb.models.model_implementations.colpali_models import COLPALI_TRAINING_DATA

    import colintern_mteb as cmteb

    sources, where = cmteb.checkpoint_training_data(epoch2, load_checkpoint(epoch2))
    assert where == "checkpoint lineage" and cmteb.mteb_training_datasets(sources) == COLPALI_TRAINING_DATA

    # a JSONL mixing image files and pseudo-paths; a warm start from a checkpoint older than lineage says so
    args = train.parse_args(
        [str(f) for f in base_flags(tiny_model_dir, pages, tmp_path / "e3", **{"--resume_ckpt": epoch1})]
    )
    rows = train.JsonlTriples(pages["jsonl"], pages["root"], num_negs=1, seed=0)
    assert train.training_data_lineage(args, rows, None) == sorted([pages["hub"], f"image files under {pages['root']}"])
    old = load_checkpoint(epoch1)
    del old["meta"]["training_data"]
    lineage = train.training_data_lineage(args, rows, old)
    assert len(lineage) == 3 and any(s.startswith("unrecorded:") and epoch1 in s for s in lineage)


def test_step_snapshot_with_other_data_or_flags_is_refused(straight_run, pages, tmp_path):
    snapshot = straight_run["out"] / "colintern_heads_step3.pt"
    flags = [f if f != str(straight_run["out"]) else str(tmp_path) for f in straight_run["flags"]]
    with pytest.raises(ValueError, match=r"lr: snapshot 0\.002, this run 0\.001"):
        run_train(*flags, "--lr", 1e-3, "--resume_ckpt", snapshot)
    other = write_jsonl(
        tmp_path / "other.jsonl", [{"query": "q", "pos": "img/apple.png"}, {"query": "r", "pos": "img/river.png"}] * 8
    )
    with pytest.raises(ValueError, match="step snapshot of another run .*data"):
        run_train(*flags, "--train_jsonl", other, "--resume_ckpt", snapshot)
    with pytest.raises(ValueError, match="--lora_r 4, this run asks for --lora_r 8"):
        run_train(*flags, "--lora_r", 8, "--resume_ckpt", snapshot)
    # made under another definition of the schedule: refused, not resumed on a schedule it did not start
    ckpt = load_checkpoint(str(snapshot))
    ckpt["train_state"]["run"]["schedule"] = "linear warmup, then constant"
    torch.save(ckpt, tmp_path / "old_schedule.pt")
    with pytest.raises(ValueError, match="schedule: snapshot 'linear warmup, then constant', this run 'linear warmup"):
        run_train(*flags, "--resume_ckpt", tmp_path / "old_schedule.pt")
    # a snapshot that does not record an entry of the run is another run's: refused, not completed with a guess
    del ckpt["train_state"]["run"]["schedule"]
    with pytest.raises(ValueError, match="schedule: snapshot None, this run 'linear warmup"):
        train.check_same_run(ckpt["train_state"]["run"], dict(ckpt["train_state"]["run"], schedule=train.SCHEDULE), "x")


# -----------------------------------------------------------------------------
# faults


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, pages, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    calls = {"n": 0}
    real_loss = cl.contrastive_loss

    def loss_nan_at_step_3(*a, **k):
        calls["n"] += 1
        value = real_loss(*a, **k)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(cl, "contrastive_loss", loss_nan_at_step_3)
    flags = base_flags(tiny_model_dir, pages, out, **{"--save_every": 1, "--epochs": 2})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 .*colintern_heads_step2\.pt"):
        run_train(*flags)
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == [
        "colintern_heads_step1.pt",
        "colintern_heads_step2.pt",
    ]
    assert load_checkpoint(str(out / "colintern_heads_step2.pt"))["meta"]["step"] == 2
    assert [s for s, *_ in read_loss_log(out)] == [1, 2]


def test_an_update_that_makes_a_weight_non_finite_stops_before_it_is_saved(
    tiny_model_dir, pages, tmp_path, monkeypatch
):
    """Finite loss and gradients, but step 3's update leaves a weight inf (as an overflowing update would: faked by
    the optimizer writing one): the run stops with one line naming the tensor, before that step is logged or saved;
    step 2's snapshot stays as it was."""
    out = tmp_path / "overflow"
    real_step, steps = torch.optim.AdamW.step, []

    def step(self, *a, **k):
        result = real_step(self, *a, **k)
        steps.append(1)
        if len(steps) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    flags = base_flags(tiny_model_dir, pages, out, **{"--save_every": 1, "--epochs": 2, "--lora": True, "--lora_r": 4})
    with pytest.raises(
        FloatingPointError,
        match=r"step 3 made page_head\.bias non-finite .*Last good "
        r"checkpoint: .*colintern_heads_step2\.pt",
    ):
        run_train(*flags)
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == [
        "colintern_heads_step1.pt",
        "colintern_heads_step2.pt",
    ]
    assert load_checkpoint(str(out / "colintern_heads_step2.pt"))["meta"]["step"] == 2  # finite, or refused
    assert [s for s, *_ in read_loss_log(out)] == [1, 2]


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "-1e-3"),
        ("--lr", "0"),
        ("--temperature", "-inf"),
        ("--temperature", "nan"),
    ],
)
def test_learning_rate_and_temperature_must_be_finite_and_positive(flag, value, capsys):
    """`--lr inf` used to train a run whose every weight was inf, and `--lr -1e-3` was taken for a flag."""
    with pytest.raises(SystemExit):
        train.parse_args(["--train_jsonl", "x.jsonl", "--out_dir", "o", flag, value])
    assert f"error: {flag} must be a finite number > 0, got {float(value)}" in capsys.readouterr().err


KILL_DURING_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import train
import colintern_loss as cl
real_save, calls = torch.save, []
def dying_save(obj, f, *a, **k):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint: write part of it, then die as a kill -9 would
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = dying_save
train.main(train.parse_args(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_leaves_previous_intact(tiny_model_dir, pages, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_SAVE.format(root=ROOT))
    flags = base_flags(tiny_model_dir, pages, out, **{"--save_every": 1, "--max_steps": 3})
    result = subprocess.run(
        [sys.executable, str(script), *map(str, flags)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not (out / "colintern_heads_step2.pt").exists()
    ckpt = load_checkpoint(str(out / "colintern_heads_step1.pt"))
    assert ckpt["meta"]["step"] == 1 and ckpt["train_state"]["kind"] == "step"


def corrupt_file(path):
    with open(path, "wb") as f:
        f.write(b"\x89PNG not really")
    return path


GOOD_ROW = {"query": "q", "pos": "img/apple.png", "negs": ["img/river.png"]}
HUB_FLAGS = {"--train_jsonl": None, "--num_negs": None}


def bad_jsonl(tmp, *rows):
    """The run's --train_jsonl, tmp/bad.jsonl: a dict is one JSON line, a str is written as it is."""
    (tmp / "bad.jsonl").write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))


def write_unreadable_image(tmp, pages):
    corrupt_file(tmp / "broken.png")
    os.symlink(os.path.join(pages["root"], "img"), tmp / "img")
    bad_jsonl(tmp, GOOD_ROW, {**GOOD_ROW, "pos": "broken.png"})


def write_hub_with_empty_query(tmp, pages):
    datasets.Dataset.from_dict({"query": ["q", " "], "image": [render_keyword_page("a")] * 2}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(tmp / "hub"))


# write(tmp, pages) puts the bad input under tmp; flags change the run's (--train_jsonl {tmp}/bad.jsonl,
# --batch_size 2); the error's message matches `message`. {tmp} and {jsonl} stand for those paths in both.
BAD_INPUTS = [
    pytest.param(
        lambda tmp, pages: bad_jsonl(tmp, GOOD_ROW, '{"query": "q", "pos": \n'),
        {},
        ValueError,
        r"{jsonl} line 2: not valid JSON",
        id="malformed_line",
    ),
    pytest.param(
        lambda tmp, pages: bad_jsonl(tmp, GOOD_ROW, {**GOOD_ROW, "negs": ["img/nope.png"]}),
        {},
        FileNotFoundError,
        r"{jsonl} line 2: page 'img/nope.png'",
        id="missing_image",
    ),
    pytest.param(
        write_unreadable_image,
        {"--root": "{tmp}"},
        ValueError,
        r"{jsonl} line 2: page 'broken.png' cannot be read: image .*broken.png",
        id="unreadable_image",
    ),
    pytest.param(
        lambda tmp, pages: bad_jsonl(tmp, GOOD_ROW, {**GOOD_ROW, "pos": pseudo_path(pages["hub"], "train", 99)}),
        {},
        IndexError,
        r"{jsonl} line 2: .*doc_99.png' points at row 99 .* has 16 rows",
        id="pseudo_path_row",
    ),
    pytest.param(
        lambda tmp, pages: bad_jsonl(tmp, {**GOOD_ROW, "negs": [pseudo_path(f"{tmp}/no-such", "train", 0)]}, GOOD_ROW),
        {},
        FileNotFoundError,
        r"{jsonl} line 1: .*no-such.* cannot be opened",
        id="pseudo_path_dataset",
    ),
    pytest.param(lambda tmp, pages: bad_jsonl(tmp, "\n"), {}, ValueError, r"{jsonl} has no triples", id="empty_jsonl"),
    # datasets itself refuses a split with no rows ("corresponds to no data"); either way the folder is named
    pytest.param(
        lambda tmp, pages: save_hub_folder(tmp / "empty", []),
        {**HUB_FLAGS, "--train_hub": "{tmp}/empty"},
        ValueError,
        r"dataset {tmp}/empty split 'train'.*(no data|empty)",
        id="empty_hub",
    ),
    pytest.param(
        write_hub_with_empty_query,
        {**HUB_FLAGS, "--train_hub": "{tmp}/hub"},
        ValueError,
        r"--train_hub {tmp}/hub split 'train': rows \[1\] .* empty query",
        id="hub_empty_query",
    ),
    pytest.param(
        lambda tmp, pages: bad_jsonl(tmp, GOOD_ROW),
        {},
        ValueError,
        r"has 1 rows; one optimizer step needs --batch_size 2",
        id="too_few_rows",
    ),
]


@pytest.mark.parametrize("write,flags,error,message", BAD_INPUTS)
def test_bad_input_names_the_culprit(write, flags, error, message, tiny_model_dir, pages, tmp_path):
    write(tmp_path, pages)
    flags = {"--batch_size": 2, "--train_jsonl": "{tmp}/bad.jsonl", **flags}
    flags = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in flags.items()}
    with pytest.raises(error, match=message.format(jsonl=tmp_path / "bad.jsonl", tmp=tmp_path)):
        run_train(*base_flags(tiny_model_dir, pages, tmp_path / "out", **flags))


def test_num_negs_with_hub_data_is_refused(pages, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--train_hub", pages["hub"], "--num_negs", "2", "--out_dir", str(tmp_path)])


# -----------------------------------------------------------------------------
# optimizers, memory knobs


def test_bitsandbytes_optimizers_run_on_cpu(capsys):
    params = [torch.nn.Parameter(torch.randn(64, 128))]
    paged = train.make_optimizer("paged_adamw_8bit", params, 1e-3)
    assert "non-paged" in capsys.readouterr().out
    import bitsandbytes as bnb

    assert type(paged) is bnb.optim.AdamW8bit
    before = params[0].detach().clone()
    params[0].grad = torch.randn_like(params[0])
    paged.step()
    assert paged.state[params[0]]["state1"].dtype == torch.uint8  # really 8-bit state
    assert not torch.equal(before, params[0])


def test_auto_batch_halves_until_it_fits(capsys):
    tried = []

    def try_batch(b):
        tried.append(b)
        if b > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    assert train.find_batch_size(try_batch, 32) == 4 and tried == [32, 16, 8, 4]
    with pytest.raises(RuntimeError, match="even one query"):
        train.find_batch_size(lambda b: try_batch(99), 2)


def test_auto_batch_probe_sees_the_whole_contrastive_step(tiny_model_dir, monkeypatch):
    """The probe's loss holds what a real step's does: this rank's step_queries queries against the pages of every
    rank with their hard negatives (micro-batch b with its graph, the rest as cached copies)."""
    seen = []
    real_loss = train.contrastive_loss

    def loss(q, q_mask, p, p_mask, pos, temperature):
        seen.append((q.shape[0], p.shape[0], q.requires_grad, int(pos.max())))
        return real_loss(q, q_mask, p, p_mask, pos, temperature)

    monkeypatch.setattr(train, "contrastive_loss", loss)
    torch.manual_seed(0)
    model, processor = ColIntern.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=4, dropout=0.0))
    model.train()
    try_batch = train.probe_batch(model, processor, num_negs=2, temperature=0.05, step_queries=8, world=2)
    try_batch(2)
    assert seen == [(8, 2 * 8 * 3, True, 7)]
    assert all(p.grad is None for p in model.trainable_parameters())  # the probe leaves no gradients behind


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_auto_batch_headroom_counts_the_optimizer_states_a_step_makes(optimizer):
    """The optimizer-state term of --auto_batch's headroom equals the bytes the optimizer really holds after its
    first step (bitsandbytes' 8-bit AdamW on the CPU keeps the GPU's layout), for tensors below and above the 4096
    values under which 8-bit AdamW keeps fp32 states. Only this arithmetic runs on the CPU; the reservation itself
    (and whether the margin suffices) needs a GPU and is untested here."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (100, 4095, 4096, 70001)]
    opt = train.make_optimizer(optimizer, params, 1e-3, say=lambda *a: None)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    held = sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values() if torch.is_tensor(t))
    assert train.optimizer_state_bytes(params, optimizer) == held
    assert train.optimizer_state_bytes(params, "paged_adamw_8bit") == train.optimizer_state_bytes(params, "adamw_8bit")


def test_auto_batch_headroom_holds_the_steps_image_features(tiny_model_dir):
    """The cached-features term is what image_features returns for the probe's worst-case page, times the step's
    pages; DDP's buckets count only with several processes; the margin is its fraction of the device."""
    model, processor = ColIntern.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=4, dropout=0.0))
    feats = model.image_features(processor.process_pages([train.probe_page(processor)])["pixel_values"])
    assert feats.shape[0] == model.max_tiles + 1  # every tile + the thumbnail: the worst case
    step_pages = 6 * (1 + 2)
    assert train.image_feature_bytes(model, processor, step_pages) == step_pages * feats.numel() * feats.element_size()
    params = model.trainable_parameters()
    n = sum(p.numel() for p in params)
    one = train.probe_headroom(params, "adamw", 1, 10_000, 123, 0.05)
    assert one == {
        "optimizer states": 8 * n + 4 * len(params),
        "DDP gradient buckets": 0,
        "cached image features": 123,
        "margin (5% of the device)": 500,
    }
    assert train.probe_headroom(params, "adamw", 8, 10_000, 123, 0.05)["DDP gradient buckets"] == 4 * n


def test_auto_batch_margin_is_a_fraction(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--train_jsonl", "x.jsonl", "--out_dir", "o", "--auto_batch_margin", "1.5"])
    assert "--auto_batch_margin is a fraction of the GPU's memory in [0, 1), got 1.5" in capsys.readouterr().err


def test_auto_batch_on_cpu_keeps_the_batch(tiny_model_dir, pages, tmp_path, capsys):
    run_train(
        *base_flags(
            tiny_model_dir, pages, tmp_path, **{"--auto_batch": True, "--max_steps": 1, "--compile_heads": True}
        )
    )
    text = capsys.readouterr().out
    assert "keeping --batch_size 4" in text and "--compile_heads: accepted for the original ColIntern commands" in text


@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_gradient_checkpointing_recomputes_language_model_only(tiny_model_dir, pages, tmp_path, monkeypatch, quantize):
    """With and without --gradient_checkpointing: no activation of the frozen vision tower or its projector requires
    grad (autograd records nothing there), only language-model layers are checkpointed, and the trained weights are
    bit-identical (checkpointing recomputes the same ops in the same order). 4bit: the same on a 4-bit language
    model, with no peft prepare_model_for_kbit_training (it would make the vision tower's inputs require grad)."""
    import transformers.modeling_utils as mu

    checkpointed, vision_grads = [], []
    real_checkpoint, real_build = mu.checkpoint, train.build_model

    def counted(function, *a, **k):
        # the layer recomputed: partial(Layer.forward, layer) from transformers 5.23, partial(layer.__call__) before
        checkpointed.append(function.args[0] if function.args else function.func.__self__)
        return real_checkpoint(function, *a, **k)

    def build_model(*a, **k):
        model, processor = real_build(*a, **k)
        for part in (model.backbone.vision_tower, model.backbone.multi_modal_projector):
            for name, module in part.named_modules():
                module.register_forward_hook(
                    lambda m, i, out, name=name: (
                        vision_grads.append(name)
                        if any(
                            t.requires_grad
                            for t in (out if isinstance(out, tuple) else (out,))
                            if isinstance(t, torch.Tensor)
                        )
                        else None
                    )
                )
        return model, processor

    monkeypatch.setattr(mu, "checkpoint", counted)
    monkeypatch.setattr(train, "build_model", build_model)
    common = {"--max_steps": 2, "--lora": True, "--lora_r": 4, "--lora_dropout": 0.0, "--quantize": quantize}
    run_train(*base_flags(tiny_model_dir, pages, tmp_path / "plain", **common))
    assert checkpointed == [] and vision_grads == []
    run_train(*base_flags(tiny_model_dir, pages, tmp_path / "gc", **common, **{"--gradient_checkpointing": True}))
    assert vision_grads == [], f"vision modules whose output requires grad: {sorted(set(vision_grads))}"
    assert checkpointed, "no layer was recomputed"
    assert {type(layer).__name__ for layer in checkpointed} == {"Qwen3DecoderLayer"}
    assert_same_weights(
        trainable(str(tmp_path / "plain" / "colintern_heads_step2.pt")),
        trainable(str(tmp_path / "gc" / "colintern_heads_step2.pt")),
    )


# -----------------------------------------------------------------------------
# many processes

# Runs train.py (torchrun or plain) with plain SGD in place of the chosen optimizer, and saves every step's loss
# and gradients (after DDP's all-reduce, before the update) per rank: what DDP guarantees is checked on them,
# before an adaptive optimizer can amplify rounding. COLINTERN_TEST_FAULT injects a known DDP bug, or a data error on
# one rank.
RECORD_GRADIENTS = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
import colintern_loss as cl
out, rank = os.environ["COLINTERN_TEST_RECORD"], int(os.environ.get("RANK", "0"))
names = {{}}
real_build = train.build_model
def build_model(*a, **k):
    model, processor = real_build(*a, **k)
    names.update({{id(p): n for n, p in model.named_parameters()}})
    return model, processor
class RecordingSGD(torch.optim.SGD):
    steps = 0
    def step(self, closure=None):
        RecordingSGD.steps += 1
        params = self.param_groups[0]["params"]
        torch.save({{names[id(p)]: p.grad.detach().clone() for p in params if p.grad is not None}},
                   os.path.join(out, f"grads_rank{{rank}}_step{{RecordingSGD.steps}}.pt"))
        return super().step(closure)
train.build_model = build_model
train.make_optimizer = lambda name, params, lr, say=print: RecordingSGD(params, lr=lr)
fault = os.environ.get("COLINTERN_TEST_FAULT")
real_gather = cl.gather_pages
if fault == "gather_without_gradients":  # other ranks' queries then send no gradient back to this rank's pages
    def gather_without_gradients(pages, page_mask, n_queries, world):
        with torch.no_grad():
            gathered, mask = real_gather(pages, page_mask, n_queries, world)
        rank = torch.distributed.get_rank()
        n_pages, length = pages.shape[0], gathered.shape[1]
        own, _ = cl.pad_left(pages, page_mask, length)  # put this rank's own pages back with their graph
        pos = list(range(rank * n_queries, (rank + 1) * n_queries))
        neg0 = world * n_queries + rank * (n_pages - n_queries)
        neg = list(range(neg0, neg0 + n_pages - n_queries))
        gathered = gathered.clone()
        gathered[pos + neg] = own
        return gathered, mask
    cl.gather_pages = gather_without_gradients
elif fault == "local_negatives":  # hard negatives of other ranks left out of the pool
    def local_negatives(pages, page_mask, n_queries, world):
        gathered, mask = real_gather(pages, page_mask, n_queries, world)
        rank, n_neg = torch.distributed.get_rank(), pages.shape[0] - n_queries
        keep = list(range(world * n_queries)) + [world * n_queries + rank * n_neg + j for j in range(n_neg)]
        return gathered[keep], mask[keep]
    cl.gather_pages = local_negatives
elif fault == "unreadable_page_on_rank_1" and rank == 1:  # a data error on one rank only
    from colintern_cli import UserValueError
    def unreadable(self, rows):
        raise UserValueError("injected: page broken.png cannot be read")
    train.Collate.__call__ = unreadable
from colintern_cli import run_cli
run_cli(train.main, train.parse_args(sys.argv[1:]))
"""

# fp32 rounding bound for comparing the two runs. Both compute the same sums in another order (per-rank partial
# sums + all-reduce vs one sum; other padding lengths, so other BLAS blockings): for a sum of n terms the
# difference is at most ~2 n u sum|terms| (u = 2^-24), typically ~sqrt(n) u sum|terms|. A gradient entry here sums
# n ~ 1e3-1e4 terms through the backward, so the typical gap is ~1e-5 of the tensor's scale and the worst case
# ~1e-3: RTOL_SUM = 2e-4 of each tensor's largest entry sits between the two. A DDP bug (a missing gather, a gather
# that drops gradients, negatives left out) moves gradients by O(1) of that scale. The loss (a mean of
# log-sum-exps of ~16 logits) gets the same bound.
RTOL_SUM = 2e-4


def launch_recording(flags, out, nproc=1, fault=None, nnodes=1):
    """train.py with RECORD_GRADIENTS in nproc processes on each of nnodes nodes -> its CompletedProcess."""
    os.makedirs(out, exist_ok=True)
    script = os.path.join(out, "record.py")
    with open(script, "w") as f:
        f.write(RECORD_GRADIENTS.format(root=ROOT))
    env = {"COLINTERN_TEST_RECORD": str(out), **({"COLINTERN_TEST_FAULT": fault} if fault else {})}
    return launch([script, *flags, "--out_dir", out], nproc=nproc, nnodes=nnodes, env=env)


def record_gradients(flags, out, nproc=1, fault=None, nnodes=1):
    """Run train.py with RECORD_GRADIENTS in nproc processes on each of nnodes nodes -> ({rank: [grads of step 1,
    step 2, ...]}, loss log)."""
    result = launch_recording(flags, out, nproc, fault, nnodes)
    assert result.returncode == 0, result.stderr[-3000:]
    grads = {}
    for rank in range(nproc * nnodes):
        steps = sorted(f for f in os.listdir(out) if f.startswith(f"grads_rank{rank}_"))
        grads[rank] = [torch.load(os.path.join(out, f"grads_rank{rank}_step{s}.pt")) for s in range(1, len(steps) + 1)]
    return grads, read_loss_log(out)


def assert_same_step(got, expected, losses_got, losses_expected, where):
    """Loss and every gradient tensor equal within RTOL_SUM of its scale; a failure shows torch's report (largest
    difference, its index, how many entries differ) prefixed with the step and the parameter."""
    assert got.keys() == expected.keys()
    worst = max(
        (float((got[k] - expected[k]).abs().max() / expected[k].abs().max().clamp(min=1e-30)), k) for k in expected
    )
    print(
        f"{where}: largest gradient difference {worst[0]:.2e} of its tensor's scale ({worst[1]}); losses "
        f"{losses_got} vs {losses_expected}"
    )
    torch.testing.assert_close(
        torch.tensor(losses_got, dtype=torch.float64),
        torch.tensor(losses_expected, dtype=torch.float64),
        rtol=RTOL_SUM,
        atol=0,
        msg=lambda m: f"{where} losses: {m}",
    )
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(
            got[name],
            expected[name],
            rtol=0,
            atol=RTOL_SUM * scale,
            msg=lambda m, name=name: f"{where} gradient of {name} (scale {scale:.3g}): {m}",
        )


@pytest.fixture(scope="module")
def ddp_case(tiny_model_dir, tmp_path_factory):
    """8 queries, each with one listed hard negative; one page is wider (3 tiles) so the ranks' page lengths differ
    and padding before the gather matters. Run once in one process with the global batch of 8 (the reference)."""
    root = tmp_path_factory.mktemp("ddp")
    words = WORDS[:8]
    for i, w in enumerate(words):
        render_keyword_page(w, size=(448, 224) if i == 0 else (224, 224)).save(root / f"{w}.png")
    jsonl = write_jsonl(
        root / "t.jsonl",
        [{"query": query(w), "pos": f"{w}.png", "negs": [f"{words[i - 1]}.png"]} for i, w in enumerate(words)],
    )
    flags = [
        "--model_id",
        tiny_model_dir,
        "--train_jsonl",
        jsonl,
        "--root",
        root,
        "--epochs",
        2,
        "--lora",
        "--lora_r",
        4,
        "--lora_dropout",
        0.0,
        "--num_negs",
        1,
        "--lr",
        2e-3,
        "--warmup_steps",
        2,
        "--optimizer",
        "adamw",
        "--num_workers",
        0,
        "--save_every",
        0,
        "--temperature",
        0.05,
    ]
    one, one_log = record_gradients(flags + ["--batch_size", 8], root / "one")
    assert len(one[0]) == 2 and [(s, e) for s, e, *_ in one_log] == [(1, 1), (2, 2)]
    return {"flags": flags, "root": root, "grads": one[0], "log": one_log}


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_global_batch(ddp_case):
    """torchrun --nproc_per_node 2 on CPU (gloo), 4 queries per rank, vs one process with the same 8 queries per
    step: the same loss and the same gradients at every step (plain SGD between steps), and identical gradients on
    both ranks after DDP's all-reduce."""
    two, two_log = record_gradients(ddp_case["flags"] + ["--batch_size", 4], ddp_case["root"] / "two", nproc=2)
    assert [(s, e, lr) for s, e, _, lr in two_log] == [(s, e, lr) for s, e, _, lr in ddp_case["log"]]
    for step, (rank0, rank1, single) in enumerate(zip(two[0], two[1], ddp_case["grads"]), 1):
        assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
        assert_same_step(rank0, single, [two_log[step - 1][2]], [ddp_case["log"][step - 1][2]], f"step {step}")
    assert any("lora_B" in k and rank0[k].abs().max() > 0 for k in rank0)  # LoRA gradients are compared too
    assert not [f for f in os.listdir(ddp_case["root"] / "two") if f.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["gather_without_gradients", "local_negatives"])
def test_ddp_comparison_fails_for_a_real_ddp_bug(ddp_case, fault):
    """The comparison above is not vacuous: a gather that drops other ranks' gradients, or a pool without other
    ranks' hard negatives, makes it fail."""
    two, two_log = record_gradients(
        ddp_case["flags"] + ["--batch_size", 4], ddp_case["root"] / fault, nproc=2, fault=fault
    )
    with pytest.raises(AssertionError, match="step 1 (losses|gradient of)"):
        assert_same_step(two[0][0], ddp_case["grads"][0], [two_log[0][2]], [ddp_case["log"][0][2]], "step 1")


@pytest.mark.slow
@pytest.mark.parametrize("nnodes,batch_size,grad_accum", [(1, 2, 4), (2, 2, 2)])
def test_grad_cache_step_equals_one_big_batch(ddp_case, nnodes, batch_size, grad_accum):
    """Gradient caching: micro-batches of 2 queries, 4 per step in one process, or 2 per step on each of 2 nodes
    (two torchrun agents of one gloo process each, c10d rendezvous on localhost: the README's multi-node command),
    make ONE contrastive batch of 8 queries against their 16 pages: the same loss and gradients (within RTOL_SUM) as
    one process with the 8 queries in one plain forward/backward."""
    out = ddp_case["root"] / f"cached-{nnodes}x{batch_size}x{grad_accum}"
    got, log = record_gradients(
        ddp_case["flags"] + ["--batch_size", batch_size, "--grad_accum", grad_accum], out, nnodes=nnodes
    )
    assert [(s, e, lr) for s, e, _, lr in log] == [(s, e, lr) for s, e, _, lr in ddp_case["log"]]
    for step, (grads, single) in enumerate(zip(got[0], ddp_case["grads"]), 1):
        assert_same_step(grads, single, [log[step - 1][2]], [ddp_case["log"][step - 1][2]], f"step {step}")


@pytest.mark.slow
def test_one_ranks_data_error_stops_every_rank_with_its_message(ddp_case):
    """A page that rank 1 alone cannot read: both processes stop at that batch instead of rank 0 waiting in the
    step's collectives. Rank 0 prints one line naming rank 1 and its error; rank 1 leaves the line to rank 0; no
    step was taken and nothing was saved."""
    out = ddp_case["root"] / "rank1-fails"
    result = launch_recording(ddp_case["flags"] + ["--batch_size", 4], out, nproc=2, fault="unreadable_page_on_rank_1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 of 2 failed while loading a batch: injected: page broken.png cannot be read"], (
        result.stderr[-3000:]
    )
    assert not [f for f in os.listdir(out) if f.startswith(("grads_", "colintern_heads_"))]


class FakeCudaGenerators:
    """Stands in for torch.cuda's per-device generators (CI has no GPU): each device's state is a counter that a
    draw advances, as dropout advances a generator's offset."""

    def __init__(self, devices: int):
        self.states = [torch.tensor([1000 * d]) for d in range(devices)]

    def draw(self, device: int) -> int:
        self.states[device] += 1
        return int(self.states[device])

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state_all(self, states):
        self.states = [s.clone() for s in states]


class DrawingEncoder(torch.nn.Module):
    """A QueryPageEncoder stand-in whose forward draws from the CPU generator and from both fake GPUs, as LoRA
    dropout does when --device_map auto spreads the layers over two GPUs, and records the draws."""

    def __init__(self, generators):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(8))
        self.generators, self.draws = generators, []

    def page_features(self, pages):
        return None

    def forward(self, queries, pages, page_features=None):
        self.draws.append((int(torch.randint(10**6, ())), self.generators.draw(0), self.generators.draw(1)))
        ones = lambda x: torch.ones(x.shape[:2], dtype=torch.bool)  # noqa: E731
        q, p = (torch.nn.functional.normalize(x * self.weight, dim=-1) for x in (queries, pages))
        return q, ones(q), p, ones(p)


def test_grad_cache_restores_every_devices_generator(monkeypatch):
    """Each micro-batch's re-encoding draws what its first encoding drew on the CPU and on EVERY GPU (not only the
    first parameter's), and the step leaves every generator where one encoding each would have: so the cached
    gradients are pushed through the function that made them. Faked devices: unverified on real multi-GPU
    hardware."""
    generators = FakeCudaGenerators(devices=2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", generators.get_rng_state_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", generators.set_rng_state_all)
    encoder = DrawingEncoder(generators)
    g = torch.Generator().manual_seed(0)
    micro_batches = [
        {"queries": torch.randn(2, 3, 8, generator=g), "pages": torch.randn(2, 5, 8, generator=g), "n_queries": 2}
        for _ in range(2)
    ]
    torch.manual_seed(0)
    cl.grad_cache_step(encoder, micro_batches, cl.StepLoss(0.05))
    first, second, again_first, again_second = encoder.draws
    assert first != second and again_first == first and again_second == second
    assert [int(s) for s in generators.states] == [2, 1002]  # as after the first encodings
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


def test_grad_cache_replays_dropout_masks(tiny_model_dir, pages, tmp_path, monkeypatch):
    """With LoRA dropout on, each micro-batch's second encoding (with its graph) equals its first (cached, no
    graph) exactly: the RNG state is restored, so the cached gradients belong to the graph they are pushed through."""
    encodings = []
    real_forward = cl.QueryPageEncoder.forward

    def forward(self, queries, pages, page_features=None):
        out = real_forward(self, queries, pages, page_features)
        if len(encodings) == 4:  # step 2 (LoRA B is 0 at step 1, so dropout cannot show): dropout is really
            # drawn, the same micro-batch with the next RNG state encodes differently
            redrawn = real_forward(self, queries, pages, page_features)
            assert not torch.equal(out[0], redrawn[0]) and not torch.equal(out[2], redrawn[2])
        encodings.append((torch.is_grad_enabled(), [t.detach().clone() for t in out]))
        return out

    monkeypatch.setattr(cl.QueryPageEncoder, "forward", forward)
    run_train(
        *base_flags(
            tiny_model_dir,
            pages,
            tmp_path,
            **{
                "--batch_size": 2,
                "--grad_accum": 2,
                "--max_steps": 2,
                "--lora": True,
                "--lora_r": 4,
                "--lora_dropout": 0.5,
            },
        )
    )
    assert [grad for grad, _ in encodings] == [False, False, True, True] * 2
    for step in (encodings[:4], encodings[4:]):
        for (_, cached), (_, again) in zip(step[:2], step[2:]):
            assert all(torch.equal(a, b) for a, b in zip(cached, again))


@pytest.mark.parametrize("dtype,offload", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_grad_cache_runs_the_vision_tower_once_per_micro_batch(tiny_model_dir, monkeypatch, dtype, offload):
    """Gradient caching's second pass takes the first's image features: the frozen vision tower runs once per
    micro-batch (not twice), and the loss and every gradient are bitwise those of re-running it (LoRA dropout on,
    so the RNG replay is part of what must agree)."""
    torch.manual_seed(0)
    model, processor = ColIntern.from_pretrained(
        tiny_model_dir, lora=LoraSettings(r=4, alpha=4, dropout=0.3), dtype=dtype
    )
    for p in model.trainable_parameters():  # LoRA B starts at 0, so the adapters would not show in the gradients
        torch.nn.init.normal_(p, std=0.05)
    model.train()
    collate = train.Collate(processor)
    sizes = [(448, 224), (224, 224), (224, 448), (448, 448)]  # pages of 3, 1, 3 and 5 tiles
    micro_batches = [
        collate(
            [
                {
                    "query": query(w),
                    "pos": render_keyword_page(w, size=sizes[i % 4]),
                    "negs": [render_keyword_page(WORDS[i + 8], size=sizes[(i + 1) % 4])],
                }
                for i, w in enumerate(WORDS[j : j + 2], start=j)
            ]
        )
        for j in (0, 2, 4)
    ]
    tower_runs = []
    model.backbone.vision_tower.register_forward_hook(lambda *a: tower_runs.append(torch.is_grad_enabled()))
    encoder = cl.QueryPageEncoder(model)

    def step():
        tower_runs.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = cl.grad_cache_step(encoder, micro_batches, cl.StepLoss(0.05, offload_features=offload))
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, list(tower_runs)

    loss, grads, runs = step()
    assert runs == [False] * 3  # once per micro-batch, without a graph
    monkeypatch.setattr(cl.QueryPageEncoder, "page_features", lambda self, pages: None)  # as before: twice
    loss_before, grads_before, runs_before = step()
    assert runs_before == [False] * 6
    assert torch.equal(loss, loss_before) and grads.keys() == grads_before.keys()
    assert all(torch.equal(grads[n], grads_before[n]) for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_image_features_of_another_batch_are_refused(tiny_model_dir):
    model, processor = ColIntern.from_pretrained(tiny_model_dir)
    one, three = (processor.process_pages([render_keyword_page("x", size=s)]) for s in ((224, 224), (448, 224)))
    with pytest.raises(ValueError, match="image tokens in the batch but image features for"):
        model.forward_pages(one, model.image_features(three["pixel_values"]))


# -----------------------------------------------------------------------------
# it learns: a tiny frozen random InternVL with LoRA + heads, keyword pages snapped to the token grid (see the
# docstring of make_synthetic_data.py for why the grid matters)


def retrieval_metrics(scores):
    """Query i's one relevant page is page i -> (Recall@1, nDCG@5); ties count against the query."""
    recall, ndcg = 0.0, 0.0
    for i, row in enumerate(scores.tolist()):
        rank = sum(s >= row[i] for j, s in enumerate(row) if j != i) + 1
        recall += rank == 1
        ndcg += 1 / math.log2(rank + 1) if rank <= 5 else 0.0
    return recall / len(scores), ndcg / len(scores)


@pytest.mark.slow
def test_it_learns_held_out_pages(tiny_model_dir, tmp_path):
    hub = tmp_path / "kw-train"
    train_words = [w for w in WORDS for _ in range(3)]
    ds = datasets.Dataset.from_dict(
        {
            "query": [query(w) for w in train_words],
            "image": [render_keyword_page(w, variant=i % 3) for i, w in enumerate(train_words)],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(hub))
    out = tmp_path / "out"
    run_train(
        "--model_id",
        tiny_model_dir,
        "--train_hub",
        hub,
        "--out_dir",
        out,
        "--batch_size",
        8,
        "--epochs",
        20,
        "--max_steps",
        200,
        "--lr",
        2e-3,
        "--warmup_steps",
        20,
        "--temperature",
        0.05,
        "--lora",
        "--lora_r",
        8,
        "--lora_alpha",
        8,
        "--lora_dropout",
        0.0,
        "--optimizer",
        "adamw",
        "--num_workers",
        1,
        "--save_every",
        0,
        "--seed",
        0,
    )
    held_out = [render_keyword_page(w, variant=4) for w in WORDS]  # renderings never trained on
    queries = [query(w) for w in WORDS]

    torch.manual_seed(0)  # train.py's initial heads and LoRA
    untrained, processor = ColIntern.from_pretrained(tiny_model_dir, lora=LoraSettings(r=8, alpha=8, dropout=0.0))
    before = retrieval_metrics(
        maxsim_scores(
            untrained.encode_queries(processor, queries), untrained.encode_pages(processor, held_out, batch_size=8)
        )
    )
    final = out / "colintern_heads_step200.pt"
    trained, processor, ckpt = ColIntern.from_checkpoint(str(final))
    after = retrieval_metrics(
        maxsim_scores(
            trained.encode_queries(processor, queries), trained.encode_pages(processor, held_out, batch_size=8)
        )
    )
    print(f"held-out Recall@1, nDCG@5: untrained {before}, trained {after}")
    assert before[0] < 0.2 and before[1] < 0.3, before  # chance: R@1 1/32, nDCG@5 ~0.1
    assert after[0] > 0.6 and after[1] > 0.7, (before, after)
    # LoRA was trained too, not only the heads: B starts at zero and A at train.py's seeded init
    init = trainable_state_dict(untrained)["lora"]
    assert init.keys() == ckpt["lora"].keys() and len(init) > 0
    for k, v in ckpt["lora"].items():
        assert not torch.equal(v, init[k]), k
        if "lora_B" in k:
            assert torch.count_nonzero(init[k]) == 0 and v.abs().max() > 1e-3, k


# -----------------------------------------------------------------------------
# bf16 / fp16 backbones (the GPU path, run on CPU with the tiny model)


class RecordingAdamW(torch.optim.AdamW):
    """torch AdamW that keeps, per step, the learning rate and the gradients it was given, and the weights before
    its first step: enough to replay the run's updates in float64."""

    runs = []

    names = {}  # id(parameter) -> its name in a checkpoint (filled by the fixture's build_model)

    def __init__(self, params, lr):
        super().__init__(params, lr=lr, weight_decay=train.WEIGHT_DECAY)
        params = self.param_groups[0]["params"]
        self.record = {
            "names": [self.names[id(p)] for p in params],
            "start": [p.detach().double().clone() for p in params],
            "steps": [],
        }
        RecordingAdamW.runs.append(self.record)

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.record["steps"].append((self.param_groups[0]["lr"], [p.grad.detach().double().clone() for p in params]))
        return super().step(closure)


@pytest.fixture(scope="module")
def low_precision_runs(tiny_model_dir, pages, tmp_path_factory):
    """6 steps at lr 5e-5 (the warmup, the cosine tail and the epoch-2 rate) with an fp32, a bf16 and an fp16
    backbone, each recording its optimizer's inputs; the bf16 run saves a step snapshot at step 3. fp16 runs up to 12
    over 4 epochs: its loss scaler starts at 2^16 and skips the steps whose fp16 gradients overflow while it halves
    its scale (with the heads computing in fp16, the first 6 here)."""
    out = tmp_path_factory.mktemp("low-precision")
    common = {"--lora": True, "--lora_r": 4, "--lora_dropout": 0.0, "--lr": 5e-5, "--warmup_steps": 0}
    runs = {}
    real, real_build = train.make_optimizer, train.build_model

    def build_model(*a, **k):
        model, processor = real_build(*a, **k)
        # checkpoint names: LoRA as peft's state dict names it (no adapter name), heads under "heads."
        RecordingAdamW.names.update(
            {
                id(p): (
                    "lora." + LORA_KEY_ADAPTER_NAME.sub(r"\1\2", n[len("backbone.") :])
                    if n.startswith("backbone.")
                    else "heads." + n
                )
                for n, p in model.named_parameters()
            }
        )
        return model, processor

    train.make_optimizer = lambda name, params, lr, say=print: RecordingAdamW(params, lr)
    train.build_model = build_model
    try:
        for dtype in ("fp32", "bf16", "fp16"):
            steps = 12 if dtype == "fp16" else 6
            flags = [
                str(f)
                for f in base_flags(
                    tiny_model_dir,
                    pages,
                    out / dtype,
                    **common,
                    **{
                        "--dtype": dtype,
                        "--save_every": 3 if dtype == "bf16" else 0,
                        "--max_steps": steps,
                        "--epochs": 4 if dtype == "fp16" else 2,
                    },
                )
            ]
            run_train(*flags)
            runs[dtype] = {"out": out / dtype, "flags": flags, "record": RecordingAdamW.runs[-1]}
    finally:
        train.make_optimizer, train.build_model = real, real_build
    return runs


def replay_in_float64(record):
    """The weights the recorded run should end with: its own gradients and learning rates through AdamW in
    float64 (the run's parameters, in the order the optimizer holds them)."""
    params = [torch.nn.Parameter(p.clone()) for p in record["start"]]
    reference = torch.optim.AdamW(params, lr=1.0, weight_decay=train.WEIGHT_DECAY)
    for lr, grads in record["steps"]:
        reference.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = g
        reference.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_backbone_trains_fp32_adapters_exactly(low_precision_runs, dtype):
    """Every trainable weight, gradient and optimizer state is fp32 over a bf16/fp16 backbone, so the updates the
    optimizer computes land in the weights: the run's final LoRA and heads equal its own gradients replayed through
    AdamW in float64, to fp32 rounding. Tolerance: each of the 6 steps rounds the weight once (half an fp32 ulp of
    |w| <= 2^-24 |w|) and Adam's fp32 update (relative ~1e-6 of lr); atol = steps x (2^-23 max|w| + 1e-4 lr) stays
    >10x below one step's update (~lr). bf16 adapters (peft's default over a bf16 base) miss it by the update itself:
    at lr 5e-5 an update below half a bf16 ulp of a ~0.1 weight rounds away."""
    run = low_precision_runs[dtype]
    last = max(run["out"].glob("colintern_heads_*.pt"), key=lambda f: load_checkpoint(str(f))["meta"]["step"])
    final = trainable(str(last))  # fp16's run may end on its epochs before its 12 steps
    record, lr = run["record"], 5e-5
    # fp16: the loss scaler starts at 2^16 and skips the steps whose gradients overflow while it finds its scale
    steps = len(record["steps"])
    assert sorted(record["names"]) == sorted(final) and (steps == 6 if dtype == "bf16" else 3 <= steps < 12)
    assert all(v.dtype == torch.float32 for v in final.values())
    for name, expected, start in zip(record["names"], replay_in_float64(record), record["start"]):
        atol = steps * (2.0**-23 * float(expected.abs().max()) + 1e-4 * lr)
        torch.testing.assert_close(
            final[name].double(), expected, rtol=0, atol=atol, msg=lambda m, name=name: f"{dtype}: {name}: {m}"
        )
        assert float((expected - start).abs().max()) > 10 * atol, f"{name}: its update is too small to compare"
    if dtype == "bf16":
        snapshot = load_checkpoint(str(run["out"] / "colintern_heads_step3.pt"))
        states = snapshot["train_state"]["optimizer"]["state"].values()
        assert states and all(st[k].dtype == torch.float32 for st in states for k in ("exp_avg", "exp_avg_sq"))
    if dtype != "bf16":  # the fp16 run took other steps than the fp32 one
        return
    # for the note: how far the low-precision forward itself moves the updates from the fp32-backbone run's
    ref = trainable(str(low_precision_runs["fp32"]["out"] / "colintern_heads_step6.pt"))
    starts = dict(zip(record["names"], record["start"]))
    off = {k: float((final[k].double() - ref[k].double()).norm() / (ref[k].double() - starts[k]).norm()) for k in final}
    print(
        f"bf16 backbone vs fp32 backbone, update difference: heads {max(v for k, v in off.items() if 'heads' in k):.0%}"
        f", LoRA up to {max(v for k, v in off.items() if 'lora' in k):.0%}"
    )


def test_bf16_run_resumes_exactly(low_precision_runs, tmp_path, monkeypatch):
    bf16 = low_precision_runs["bf16"]
    flags = [f if f != str(bf16["out"]) else str(tmp_path) for f in bf16["flags"]]
    monkeypatch.setattr(
        train,
        "make_optimizer",
        lambda name, params, lr, say=print: torch.optim.AdamW(params, lr=lr, weight_decay=train.WEIGHT_DECAY),
    )  # the straight run's optimizer class, without recording
    run_train(*flags, "--resume_ckpt", bf16["out"] / "colintern_heads_step3.pt")
    assert_same_weights(
        trainable(str(bf16["out"] / "colintern_heads_step6.pt")), trainable(str(tmp_path / "colintern_heads_step6.pt"))
    )


# -----------------------------------------------------------------------------
# quantised backbone (--quantize)


@pytest.fixture(scope="module")
def quantized_runs(tiny_model_dir, pages, tmp_path_factory):
    """The same 12 steps (8 rows, one step per epoch, hard negatives) on a bf16 and on a 4-bit backbone; the 4-bit
    run saves a step snapshot at step 6."""
    out = tmp_path_factory.mktemp("quantized")
    with open(pages["jsonl"]) as f:
        jsonl = write_jsonl(out / "eight.jsonl", [json.loads(line) for line in f][:8])
    runs = {}
    for name, flags in (("bf16", {"--dtype": "bf16"}), ("4bit", {"--quantize": "4bit", "--save_every": 6})):
        runs[name] = {
            "out": out / name,
            "flags": [
                str(f)
                for f in base_flags(
                    tiny_model_dir,
                    pages,
                    out / name,
                    **{
                        "--train_jsonl": jsonl,
                        "--batch_size": 8,
                        "--epochs": 12,
                        "--warmup_steps": 2,
                        "--lora": True,
                        "--lora_r": 8,
                        "--lora_alpha": 8,
                        "--lora_dropout": 0.0,
                        **flags,
                    },
                )
            ],
        }
        run_train(*runs[name]["flags"])
    return runs


def test_4bit_backbone_loss_falls_like_bf16(quantized_runs):
    """Both runs start near ln(16) (16 candidate pages, untrained) and fall. The 4-bit language model computes other
    hidden states than the bf16 one (NF4 error on random weights), so the trajectories differ; what must hold is
    that LoRA and heads learn through it as well: its loss drop (first 3 vs last 3 steps) is at least half the bf16
    run's. Measured: bf16 1.29, 4bit 1.13; with LoRA frozen on the 4-bit model (heads only) 0.53, which fails."""
    drops = {}
    for name, run in quantized_runs.items():
        log = read_loss_log(run["out"])
        assert len(log) == 12
        first, last = sum(x[2] for x in log[:3]) / 3, sum(x[2] for x in log[-3:]) / 3
        assert first > 0.8 * math.log(16), (name, first)
        drops[name] = first - last
    print(f"loss drop over 12 steps: bf16 {drops['bf16']:.3f}, 4bit {drops['4bit']:.3f}")
    assert drops["bf16"] > 0.3 * math.log(16) and drops["4bit"] > 0.5 * drops["bf16"], drops
    ckpt = load_checkpoint(str(quantized_runs["4bit"]["out"] / "colintern_heads_epoch12.pt"))
    assert ckpt["meta"]["quantize"] == "4bit" and ckpt["train_state"]["run"]["quantize"] == "4bit"
    assert all(
        v.dtype == torch.float32
        for v in trainable(str(quantized_runs["4bit"]["out"] / "colintern_heads_epoch12.pt")).values()
    )


def test_4bit_run_resumes_exactly_and_keeps_its_quantization(quantized_runs, tmp_path, capsys):
    run = quantized_runs["4bit"]
    snapshot = run["out"] / "colintern_heads_step6.pt"
    flags = [f if f != str(run["out"]) else str(tmp_path / "resumed") for f in run["flags"]]
    no_flag = [f for i, f in enumerate(flags) if f != "--quantize" and (i == 0 or flags[i - 1] != "--quantize")]
    run_train(*no_flag, "--resume_ckpt", snapshot)  # without --quantize: the snapshot's
    assert_same_weights(
        trainable(str(run["out"] / "colintern_heads_epoch12.pt")),
        trainable(str(tmp_path / "resumed" / "colintern_heads_epoch12.pt")),
    )
    assert read_loss_log(tmp_path / "resumed") == read_loss_log(run["out"])[6:]
    elsewhere = [f if f != str(tmp_path / "resumed") else str(tmp_path / "unquantized") for f in no_flag]
    with pytest.raises(ValueError, match="step snapshot of another run .*quantize: snapshot '4bit', this run 'none'"):
        run_train(*elsewhere, "--quantize", "none", "--resume_ckpt", snapshot)


def test_warm_start_onto_another_quantization_says_so(quantized_runs, tmp_path, capsys):
    run = quantized_runs["bf16"]
    flags = [f if f != str(run["out"]) else str(tmp_path) for f in run["flags"]]
    run_train(*flags, "--quantize", "8bit", "--epochs", 1, "--resume_ckpt", run["out"] / "colintern_heads_epoch12.pt")
    text = capsys.readouterr().out
    assert "was trained on a --quantize none backbone and is loaded on a --quantize 8bit one" in text
    assert "warm start" in text
    assert load_checkpoint(str(tmp_path / "colintern_heads_epoch13.pt"))["meta"]["quantize"] == "8bit"
    with pytest.raises(ValueError, match="--quantize 8bit with --dtype fp32"):
        run_train(*flags, "--quantize", "8bit", "--dtype", "fp32", "--overwrite")
