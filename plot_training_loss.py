"""Plot training loss against the global step: raw and smoothed curves, epoch boundaries marked.

    python plot_training_loss.py --input outputs/run/training_loss.txt --out outputs/run/loss.png --smooth 200
    python plot_training_loss.py --input runA/training_loss.txt runB/training_loss.txt --out loss.png

Reads the `training_loss.txt` that train.py writes: a `# step epoch loss lr` header, then one whitespace-separated
line per optimizer step. Each file is one curve, named by its folder (a resumed run in another folder continues the
step and epoch numbers, so its curve continues the first one). The smoothed curve is a trailing moving average over
`--smooth` steps, shorter at the start of a run and for runs shorter than the window. Where the training data
changes between runs (read from the args.json train.py writes beside each loss file), the epoch label at that start
names the new data: an epoch on mined hard negatives starts at a higher loss than the in-batch epoch before it
because its negatives are harder, not because training regressed.
"""

import json
import math
import os

import numpy as np

from colintern_cli import ArgumentParser, UserFileNotFoundError, UserValueError, run_cli
from colintern_data import atomic_path, check_output

COLUMNS = ("step", "epoch", "loss")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported when a figure is drawn (--help needs none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_loss_file(path: str) -> dict:
    """-> {"step": array, "epoch": array, "loss": array}. Columns come from the `# step epoch loss lr` header
    (that order when there is none); errors name the file and line."""
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"--input {path} does not exist")
    names = ["step", "epoch", "loss", "lr"]
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if fields[0].startswith("#"):
                header = " ".join(fields).lstrip("#").split()
                if not rows and all(c in header for c in COLUMNS):
                    names = header
                continue
            if len(fields) != len(names):
                raise UserValueError(
                    f"{path} line {n}: expected {len(names)} fields ({' '.join(names)}), "
                    f"got {len(fields)}: {line.strip()!r}"
                )
            try:
                values = [float(x) for x in fields]
            except ValueError as e:
                raise UserValueError(f"{path} line {n}: not numbers ({e}): {line.strip()!r}") from e
            rows.append(values)
    if not rows:
        raise UserValueError(f"{path} has no loss lines (expected '# step epoch loss lr' then one line per step)")
    table = np.array(rows)  # (steps, columns)
    return {c: table[:, names.index(c)] for c in COLUMNS}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start); NaN losses are left out of the mean."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    start = np.arange(len(values)) - window  # index just before each window
    prev_sums = np.where(start >= 0, sums[np.maximum(start, 0)], 0.0)
    prev_counts = np.where(start >= 0, counts[np.maximum(start, 0)], 0)
    n = counts - prev_counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums - prev_sums) / np.maximum(n, 1), np.nan)


def epoch_starts(steps: np.ndarray, epochs: np.ndarray) -> list:
    """[(step, epoch)] at the first line and at each line where the epoch number changes."""
    change = np.concatenate([[0], np.nonzero(np.diff(epochs) != 0)[0] + 1])
    return [(float(steps[i]), int(epochs[i])) for i in change]


def run_data(path: str) -> str | None:
    """What the run in `path`'s folder trained on, from train.py's args.json beside it; None without one."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "args.json")) as f:
            args = json.load(f)
    except (OSError, ValueError):
        return None
    if args.get("train_jsonl"):
        negs = args.get("num_negs") or 0
        return f"{os.path.basename(args['train_jsonl'])}, {negs} hard negative{'s' if negs != 1 else ''}"
    if args.get("train_hub"):
        return f"{args['train_hub']}, in-batch negatives"
    return None


def epoch_labels(runs: list) -> dict:
    """{step: label} for the top axis: 'epoch E' at each epoch start, and at a run's first start also the data
    it trained on when that differs from the previous run's."""
    labels, previous = {}, None
    for _, data, source in runs:
        for k, (step, epoch) in enumerate(epoch_starts(data["step"], data["epoch"])):
            label = f"epoch {epoch}"
            if k == 0 and source is not None and source != previous:
                label += f"\n{source}"
            labels.setdefault(step, label)
        previous = source if source is not None else previous
    return labels


def run_label(path: str) -> str:
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder or os.path.basename(path)


def plot(runs: list, smooth: int):
    """runs: [(label, data, what it trained on or None)] -> matplotlib figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, data, _) in enumerate(runs):
        color = colors[i % len(colors)]
        window = min(smooth, len(data["loss"]))
        ax.plot(data["step"], data["loss"], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(
            data["step"],
            moving_average(data["loss"], window),
            color=color,
            linewidth=2,
            label=f"{label} (mean of {window} steps)",
        )
        for step, _ in epoch_starts(data["step"], data["epoch"]):
            ax.axvline(step, color=color, linestyle=":", linewidth=1)
    starts = epoch_labels(runs)
    # epoch labels on a top axis of their own, where neither curves nor the legend can hide them
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(starts), labels=list(starts.values()), fontsize=8)
    ax.set_xlabel("global step")
    ax.set_ylabel("training loss")
    ax.set_title(
        "Training loss (thin: per step, thick: moving average; dotted: epoch starts, labelled with the "
        "training data where it changes)",
        pad=30,
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str) -> None:
    """PNG written to a temp file then renamed: a crash never leaves a half-written image."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        pyplot().close(fig)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="training_loss.txt file(s) written by train.py, or the run folders (train.py --out_dir) that hold them",
    )
    p.add_argument("--out", "--output", dest="out", required=True, help="PNG file to write")
    p.add_argument("--smooth", type=int, default=200, help="moving-average window in steps (clipped to the run)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth must be >= 1, got {args.smooth}")
    for i, path in enumerate(args.input):
        if os.path.isdir(path):
            args.input[i] = os.path.join(path, "training_loss.txt")
            if not os.path.isfile(args.input[i]):
                p.error(
                    f"--input {path} is a folder with no training_loss.txt in it (train.py writes one into its "
                    f"--out_dir)"
                )
    return args


def main(args):
    check_output(args.out, "--out")
    runs = [(run_label(path), read_loss_file(path), run_data(path)) for path in args.input]
    save_figure(plot(runs, args.smooth), args.out)
    for (_label, data, _), path in zip(runs, args.input):
        last = data["loss"][np.isfinite(data["loss"])]
        final = f"{last[-min(len(last), args.smooth) :].mean():.4f}" if len(last) else "nan"
        print(
            f"{path}: {len(data['step'])} steps, epochs {int(data['epoch'].min())}-{int(data['epoch'].max())}, "
            f"final mean loss {final}" + ("" if math.isfinite(float(data["loss"][-1])) else " (last loss not finite)")
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main, parse_args())
