r"""Compare eval.py summaries: per benchmark and metric, one figure of per-task grouped bars plus the average.

    python plot_vidore_metrics.py --inputs outputs/eval/epoch1.json outputs/eval/epoch2.json --labels E1 E2 \
        --out_dir outputs/plots
    python plot_vidore_metrics.py --inputs a.json --labels untrained --out_dir plots --metrics ndcg_at_5 recall_at_1

Reads the `--out` files of eval.py (`{"benchmarks": {name: {"main_score": metric, "tasks": {task: {metric:
value}}, "average": {metric: value}}}}`, mteb's 0-1 values) and writes `OUT_DIR/<benchmark>_<metric>.png` for every
benchmark found in any input, by default for its own main score (ViDoRe v1/v2 nDCG@5, v3 nDCG@10, as mteb's
leaderboard ranks them; `--metrics all` for every metric), with scores x100 and metric names
(colintern_cli.metric_label) as in eval.py's table. A task or
benchmark missing from an input has no bar for it. The average group is each input's own benchmark average, as
eval.py computed it.
"""

import json
import os
import re

import numpy as np

from colintern_cli import ArgumentParser, UserFileNotFoundError, UserValueError, metric_label, run_cli
from colintern_data import check_output
from plot_training_loss import pyplot, save_figure  # Agg pyplot on first use; temp file + rename, closes the figure

AVERAGE = "average"


def read_summary(path: str) -> dict:
    """-> {benchmark: {"tasks": {task: {metric: value}}, "average": {metric: value}}}, checked."""
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"--inputs {path} does not exist")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise UserValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, dict) or not benchmarks:
        raise UserValueError(f"{path} has no 'benchmarks' entry: is it an eval.py --out file?")
    for name, entry in benchmarks.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tasks"), dict):
            raise UserValueError(f"{path}: benchmark {name!r} has no 'tasks' mapping")
    return benchmarks


def available_metrics(summaries: list) -> list:
    """Metrics in the order they first appear in the inputs."""
    seen = {}
    for summary in summaries:
        for entry in summary.values():
            for metrics in list(entry["tasks"].values()) + [entry.get("average", {})]:
                seen.update(dict.fromkeys(metrics))
    return list(seen)


def main_score(summaries: list, benchmark: str) -> str:
    """The benchmark's main score as eval.py recorded it (the first input that has the benchmark and says), else
    nDCG@5 (ViDoRe v1/v2's, what summaries written before eval.py recorded it report first)."""
    return next((s[benchmark]["main_score"] for s in summaries if "main_score" in s.get(benchmark, {})), "ndcg_at_5")


def task_label(task: str) -> str:
    """A task's name for the axis: eval.py names a --local_task folder `<folder>@<fingerprint>`; show the folder."""
    return re.sub(r"@[0-9a-f]{6,}$", "", task)


def grouped_values(summaries: list, benchmark: str, metric: str):
    """-> (group names: tasks, then 'average' when there is more than one task, values (inputs, groups) x100 with
    NaN where missing)."""
    tasks = {}
    for summary in summaries:
        tasks.update(dict.fromkeys(summary.get(benchmark, {}).get("tasks", {})))
    groups = list(tasks) + ([AVERAGE] if len(tasks) > 1 else [])
    values = np.full((len(summaries), len(groups)), np.nan)
    for i, summary in enumerate(summaries):
        entry = summary.get(benchmark, {})
        for j, task in enumerate(tasks):
            value = entry.get("tasks", {}).get(task, {}).get(metric)
            if value is not None:
                values[i, j] = 100 * value
        average = entry.get("average", {}).get(metric)
        if average is not None and groups[-1] == AVERAGE:
            values[i, -1] = 100 * average
    return groups, values


def plot_benchmark(benchmark: str, metric: str, groups: list, values: np.ndarray, labels: list):
    n_inputs, n_groups = values.shape
    has_average = groups[-1] == AVERAGE
    n_tasks = n_groups - has_average
    width = 0.8 / n_inputs
    fig, ax = pyplot().subplots(figsize=(max(6.0, 1.0 + n_groups * (0.4 + 0.25 * n_inputs)), 5.5))
    x = np.arange(n_groups, dtype=float)
    if has_average:
        x[-1] += 0.5  # set the average apart from the tasks
    annotate = values.size <= 40
    for i, label in enumerate(labels):
        offsets = x - 0.4 + width * (i + 0.5)
        missing = np.isnan(values[i]).all()
        bars = ax.bar(
            offsets,
            np.nan_to_num(values[i], nan=0.0),
            width,
            label=f"{label} (not evaluated on {benchmark})" if missing else label,
        )
        for bar, value, is_average in zip(bars, values[i], np.arange(n_groups) == n_tasks):
            if np.isnan(value):
                bar.set_visible(False)
            elif annotate or is_average:
                ax.annotate(
                    f"{value:.1f}",
                    (bar.get_x() + bar.get_width() / 2, value),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    names = [task_label(g) for g in groups[:n_tasks]]
    if has_average:
        ax.axvline(x[-1] - 0.75, color="grey", linewidth=0.8, linestyle="--")
        names.append(f"{AVERAGE} ({n_tasks} tasks)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30 if n_groups > 1 else 0, ha="right" if n_groups > 1 else "center", fontsize=8)
    ax.set_xlabel("task" if n_tasks == 1 else f"task ({n_tasks} tasks)")
    ax.set_ylabel(f"{metric_label(metric)} (x100)")
    top = np.nanmax(values) if np.isfinite(values).any() else 100
    ax.set_ylim(0, min(105, top * 1.15 + 1))
    ax.set_title(f"{benchmark}: {metric_label(metric)}" + (" (1 task)" if n_tasks == 1 else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    fig.tight_layout()
    return fig


def figure_name(benchmark: str, metric: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9.]+', '_', benchmark).strip('_')}_{metric}.png"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--inputs", nargs="+", required=True, help="eval.py --out files, one per model/checkpoint")
    p.add_argument("--labels", nargs="+", required=True, help="one legend label per input, in the same order")
    p.add_argument(
        "--out_dir", "--outdir", dest="out_dir", required=True, help="folder for the PNGs (<benchmark>_<metric>.png)"
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="metrics to plot, as eval.py names them "
        "(e.g. ndcg_at_5 recall_at_1), or all (every metric in the inputs); default: each benchmark's "
        "main score (summaries from before eval.py recorded it: nDCG@5)",
    )
    args = p.parse_args(argv)
    if len(args.labels) != len(args.inputs):
        p.error(f"--labels has {len(args.labels)} labels for {len(args.inputs)} --inputs: give one per input")
    return args


def main(args):
    check_output(args.out_dir, "--out_dir", "folder")
    summaries = [read_summary(path) for path in args.inputs]
    known = available_metrics(summaries)
    metrics = known if args.metrics == ["all"] else args.metrics
    unknown = [m for m in metrics or [] if m not in known]
    if unknown:
        raise UserValueError(f"--metrics {unknown} are in none of the inputs; they have: {', '.join(known)}")
    benchmarks = list(dict.fromkeys(b for summary in summaries for b in summary))
    written = []
    for benchmark in benchmarks:
        for metric in metrics or [main_score(summaries, benchmark)]:
            groups, values = grouped_values(summaries, benchmark, metric)
            path = os.path.join(args.out_dir, figure_name(benchmark, metric))
            save_figure(plot_benchmark(benchmark, metric, groups, values, args.labels), path)
            written.append(path)
    print(
        f"wrote {len(written)} figures ({len(benchmarks)} benchmarks x "
        f"{f'{len(metrics)} metrics' if metrics else 'its main score'}) to {args.out_dir}"
    )
    for path in written:
        print(f"  {path}")
    return written


if __name__ == "__main__":
    run_cli(main, parse_args())
