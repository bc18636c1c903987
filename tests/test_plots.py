"""plot_training_loss.py and plot_vidore_metrics.py: the PNGs are written and readable, the numbers behind them are
right, and bad input is named."""

import json
import math

import numpy as np
import pytest
from PIL import Image

import plot_training_loss
import plot_vidore_metrics


def write_loss_file(path, steps, epoch_of, loss_of, header="# step epoch loss lr"):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [f"{s} {epoch_of(s)} {loss_of(s):.5f} 1.00e-03" for s in steps]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def assert_png(path, min_size=(400, 300)):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]


def test_loss_plot_written_with_clipped_smoothing_and_epochs(tmp_path, capsys):
    first = write_loss_file(
        tmp_path / "runA" / "training_loss.txt",
        range(1, 121),
        lambda s: 1 + (s - 1) // 50,
        lambda s: 2 * math.exp(-s / 40) + 0.1 * math.sin(s),
    )
    short = write_loss_file(tmp_path / "runB" / "training_loss.txt", range(121, 126), lambda s: 3, lambda s: 0.3)
    out = tmp_path / "plots" / "loss.png"
    plot_training_loss.main(
        plot_training_loss.parse_args(["--input", first, short, "--out", str(out), "--smooth", "200"])
    )
    assert_png(out)
    printed = capsys.readouterr().out
    assert "120 steps, epochs 1-3" in printed and "5 steps, epochs 3-3" in printed

    # the data each run trained on comes from train.py's args.json beside its loss file; where it changes, the
    # epoch label says so (a run without args.json gets plain epoch labels)
    (tmp_path / "runA" / "args.json").write_text(
        json.dumps({"train_hub": "vidore/colpali_train_set", "train_jsonl": None, "num_negs": 0})
    )
    (tmp_path / "runB" / "args.json").write_text(
        json.dumps({"train_hub": None, "train_jsonl": "out/mined.jsonl", "num_negs": 2})
    )
    runs = [(p, plot_training_loss.read_loss_file(p), plot_training_loss.run_data(p)) for p in (first, short)]
    assert plot_training_loss.epoch_labels(runs) == {
        1.0: "epoch 1\nvidore/colpali_train_set, in-batch negatives",
        51.0: "epoch 2",
        101.0: "epoch 3",
        121.0: "epoch 3\nmined.jsonl, 2 hard negatives",
    }
    plot_training_loss.main(plot_training_loss.parse_args(["--input", first, short, "--output", str(out)]))
    assert_png(out)

    data = plot_training_loss.read_loss_file(first)
    assert plot_training_loss.epoch_starts(data["step"], data["epoch"]) == [(1.0, 1), (51.0, 2), (101.0, 3)]
    loss = list(data["loss"])
    for window in (1, 7, 200):  # 200 > the run: every point averages what came before it
        smoothed = plot_training_loss.moving_average(data["loss"], window)
        naive = [
            sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1])
            for i in range(len(loss))
        ]
        assert np.allclose(smoothed, naive)


def test_loss_plot_bad_input_names_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        plot_training_loss.read_loss_file(str(tmp_path / "nowhere.txt"))
    bad = tmp_path / "training_loss.txt"
    bad.write_text("# step epoch loss lr\n1 1 0.5 1e-3\n2 1 oops 1e-3\n")
    with pytest.raises(ValueError, match=r"training_loss.txt line 3: not numbers"):
        plot_training_loss.read_loss_file(str(bad))
    bad.write_text("# step epoch loss lr\n1 1 0.5 1e-3\n2 1 0.4\n")
    with pytest.raises(ValueError, match=r"line 3: expected 4 fields"):
        plot_training_loss.read_loss_file(str(bad))
    bad.write_text("# step epoch loss lr\n")
    with pytest.raises(ValueError, match="no loss lines"):
        plot_training_loss.read_loss_file(str(bad))
    with pytest.raises(SystemExit):
        plot_training_loss.parse_args(["--input", str(bad), "--output", "x.png", "--smooth", "0"])


def summary(benchmarks):
    """An eval.py --out with per-task metrics; the average is the task mean, as eval.py writes it."""
    out = {}
    for name, tasks in benchmarks.items():
        metrics = list(next(iter(tasks.values())))
        out[name] = {"tasks": tasks, "average": {m: sum(t[m] for t in tasks.values()) / len(tasks) for m in metrics}}
    return {"ckpt": "x.pt", "model_id": "m", "benchmarks": out}


@pytest.fixture
def inputs(tmp_path):
    a = summary(
        {
            "ViDoRe(v1)": {
                "TaskA": {"ndcg_at_5": 0.5, "recall_at_1": 0.25},
                "TaskB": {"ndcg_at_5": 0.7, "recall_at_1": 0.5},
            }
        }
    )
    b = summary(
        {
            "ViDoRe(v1)": {"TaskA": {"ndcg_at_5": 0.9, "recall_at_1": 0.75}},  # TaskB not evaluated here
            "local": {"eval@d4fc2cf5": {"ndcg_at_5": 1.0, "recall_at_1": 1.0}},
        }
    )
    paths = []
    for name, data in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    return paths


def test_metrics_plots_one_figure_per_benchmark_and_metric(tmp_path, inputs):
    outdir = tmp_path / "plots"
    written = plot_vidore_metrics.main(
        plot_vidore_metrics.parse_args(
            ["--inputs", *inputs, "--labels", "E1", "E2", "--out_dir", str(outdir), "--metrics", "all"]
        )
    )
    expected = {f"{b}_{m}.png" for b in ("ViDoRe_v1", "local") for m in ("ndcg_at_5", "recall_at_1")}
    assert {p.name for p in outdir.iterdir()} == expected
    assert sorted(written) == sorted(str(outdir / name) for name in expected)
    for name in expected:
        assert_png(outdir / name)

    summaries = [plot_vidore_metrics.read_summary(p) for p in inputs]
    groups, values = plot_vidore_metrics.grouped_values(summaries, "ViDoRe(v1)", "ndcg_at_5")
    assert groups == ["TaskA", "TaskB", "average"]
    assert np.allclose(values[0], [50, 70, 60])
    assert np.allclose(values[1, [0, 2]], [90, 90]) and np.isnan(values[1, 1])
    groups, values = plot_vidore_metrics.grouped_values(summaries, "local", "recall_at_1")
    assert groups == ["eval@d4fc2cf5"]  # one task: no "average" group repeating it
    assert np.isnan(values[0]).all() and np.allclose(values[1], [100])
    assert plot_vidore_metrics.task_label("eval@d4fc2cf5") == "eval"  # a --local_task folder's name, readable
    # metrics are named as eval.py's table heads them (colintern_cli.metric_label)
    fig = plot_vidore_metrics.plot_benchmark("local", "recall_at_1", groups, values, ["E1", "E2"])
    assert fig.axes[0].get_ylabel() == "Recall@1 (x100)" and fig.axes[0].get_title() == "local: Recall@1 (1 task)"
    plot_training_loss.pyplot().close(fig)
    assert plot_vidore_metrics.task_label("Vidore2ESGReportsRetrieval") == "Vidore2ESGReportsRetrieval"

    only = tmp_path / "only"
    plot_vidore_metrics.main(
        plot_vidore_metrics.parse_args(
            ["--inputs", inputs[0], "--labels", "E1", "--outdir", str(only), "--metrics", "recall_at_1"]
        )
    )
    assert [p.name for p in only.iterdir()] == ["ViDoRe_v1_recall_at_1.png"]


def test_metrics_plots_default_to_each_benchmarks_main_score(tmp_path):
    """Without --metrics, one figure a benchmark, for the main score eval.py recorded for it (ViDoRe v3 ranks by
    nDCG@10, v1 by nDCG@5); a summary from before it was recorded gets nDCG@5."""
    new = summary(
        {
            "ViDoRe(v1)": {"A": {"ndcg_at_5": 0.5, "ndcg_at_10": 0.6}},
            "ViDoRe(v3)": {"B": {"ndcg_at_5": 0.3, "ndcg_at_10": 0.4}},
        }
    )
    new["benchmarks"]["ViDoRe(v1)"]["main_score"], new["benchmarks"]["ViDoRe(v3)"]["main_score"] = (
        "ndcg_at_5",
        "ndcg_at_10",
    )
    old = summary({"ViDoRe(v3)": {"B": {"ndcg_at_5": 0.2, "ndcg_at_10": 0.3}}, "local": {"C": {"ndcg_at_5": 1.0}}})
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "old.json").write_text(json.dumps(old))
    plot_vidore_metrics.main(
        plot_vidore_metrics.parse_args(
            [
                "--inputs",
                str(tmp_path / "old.json"),
                str(tmp_path / "new.json"),
                "--labels",
                "old",
                "new",
                "--outdir",
                str(tmp_path / "plots"),
            ]
        )
    )
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "ViDoRe_v1_ndcg_at_5.png",
        "ViDoRe_v3_ndcg_at_10.png",
        "local_ndcg_at_5.png",
    ]


def test_metrics_plot_bad_input(tmp_path, inputs, capsys):
    with pytest.raises(SystemExit):
        plot_vidore_metrics.parse_args(["--inputs", *inputs, "--labels", "E1", "--outdir", str(tmp_path)])
    assert "--labels has 1 labels for 2 --inputs" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing.json"):
        plot_vidore_metrics.main(
            plot_vidore_metrics.parse_args(
                ["--inputs", str(tmp_path / "missing.json"), "--labels", "E1", "--outdir", str(tmp_path)]
            )
        )
    with pytest.raises(ValueError, match=r"--metrics \['mrr_at_10'\] are in none of the inputs"):
        plot_vidore_metrics.main(
            plot_vidore_metrics.parse_args(
                ["--inputs", inputs[0], "--labels", "E1", "--outdir", str(tmp_path), "--metrics", "mrr_at_10"]
            )
        )
    not_eval = tmp_path / "loss.json"
    not_eval.write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(ValueError, match="loss.json has no 'benchmarks'"):
        plot_vidore_metrics.read_summary(str(not_eval))
    not_eval.write_text("{broken")
    with pytest.raises(ValueError, match="loss.json is not valid JSON"):
        plot_vidore_metrics.read_summary(str(not_eval))


def test_loss_plot_takes_the_run_folder_and_names_an_empty_one(tmp_path, capsys):
    """--input may be train.py's --out_dir (its training_loss.txt is read); a folder without one is named."""
    write_loss_file(tmp_path / "run" / "training_loss.txt", range(1, 11), lambda s: 1, lambda s: 1.0 / s)
    args = plot_training_loss.parse_args(["--input", str(tmp_path / "run"), "--output", str(tmp_path / "l.png")])
    assert args.input == [str(tmp_path / "run" / "training_loss.txt")]
    plot_training_loss.main(args)
    assert "10 steps" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        plot_training_loss.parse_args(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "e.png")])
    assert f"--input {tmp_path / 'empty'} is a folder with no training_loss.txt" in capsys.readouterr().err
