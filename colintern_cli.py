"""The command-line layer every ColIntern script shares: its argument parser, how it reports errors, its progress
bars and the names it prints metrics under. No torch here, so the plot scripts and the page renderer start at once.

    from colintern_cli import ArgumentParser, progress_bar, run_cli

    def parse_args(argv=None):
        p = ArgumentParser(description=__doc__)     # --help keeps the docstring's lines and shows every default
        ...
    if __name__ == "__main__":
        run_cli(main, parse_args())

Errors. A mistake the user can fix (a missing file, a bad flag, malformed data, a checkpoint of the wrong kind)
prints one line `error: ...` on stderr and exits 1; a command-line mistake (argparse's, or a check in parse_args)
adds one `hint: ...` line that points at --help and exits 2. Anything else is a bug and keeps its traceback;
`COLINTERN_DEBUG=1` keeps every traceback.

What counts as the user's mistake is decided by the exception's type, never by where it was raised:
  - a UserError, raised on purpose where the mistake is found, its message written for the user (the project's
    convention: it names the file, line, flag or id and says what to do). It comes in the flavour a caller would
    catch: UserValueError is a ValueError, UserFileNotFoundError a FileNotFoundError, and so on;
  - an OSError the operating system raised for a path (errno and filename set: a missing file, a folder where
    nothing may be written, a full disk), wherever the call was made, `os.makedirs` of an --out_dir included;
  - a UserError raised in a DataLoader worker process: torch re-raises it with its own type, the worker's
    traceback as its text, and the line keeps the original message.
A ValueError from inside torch, a KeyError from `d[k]` or a plain `raise ValueError(...)` is a bug: traceback.

Under torchrun, rank 0 prints a mistake that the ranks agreed on (colintern_launch.ranks_agree: 'rank R of N failed
while ...'); the other ranks exit 1 without repeating it, and print what only they know: a bug's traceback, or a
mistake found outside an agreed step, as `error: rank R: ...`.
"""

import argparse
import functools
import os
import re
import sys

DEBUG_ENV = "COLINTERN_DEBUG"
# How torch re-raises an exception of a DataLoader worker: its type with this message (torch/_utils.py)
WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback", re.S)
# Progress bars written to a file or a pipe: one plain line at most every this many seconds, and the last one
LOG_PROGRESS_INTERVAL = 30.0


# -----------------------------------------------------------------------------
# Parsing


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (a script's docstring: its example commands keep their lines), and every flag that
    takes a value with its default, unless the help text places it itself (`%(default)s`) or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default is None or action.default == argparse.SUPPRESS or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, and command-line mistakes as one `error:` line and a `hint:` line (exit 2),
    instead of the whole usage block above the message."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault(
            "epilog",
            f"A mistake such as a missing file, a bad flag or malformed data prints one "
            f"error line; {DEBUG_ENV}=1 shows its traceback.",
        )
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-3" for a flag (its own pattern knows no exponent), so `--lr -1e-3` failed with "expected
        # one argument" instead of reaching the range check; no flag here looks like a number
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message):
        self.exit(2, f"error: {message}\nhint: python {self.prog} --help explains every flag\n")


def validated(check):
    """An argparse `type` that runs check(value), which raises ValueError with a message, and keeps the value: the
    message becomes the flag's error line."""

    def parse(value: str) -> str:
        try:
            check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
        return value

    parse.__name__ = check.__name__
    return parse


def existing_file(path: str) -> str:
    """An argparse `type` for a file that must exist now."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(
            f"{path} is a folder, not a file" if os.path.isdir(path) else f"{path} does not exist"
        )
    return path


def looks_like_local_path(model_id: str) -> bool:
    """A folder (relative, absolute, ~, or one that exists), not an `owner/name` hub id."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") != 1 or os.path.exists(model_id)


def looks_like_hub_id(path: str) -> bool:
    """`owner/name` that is no local file or folder (and no .pt file name): a hub repository to download."""
    return not os.path.exists(path) and not path.endswith(".pt") and not looks_like_local_path(path)


def trained_model(path: str) -> str:
    """An argparse `type` for a trained ColIntern: a .pt checkpoint or an exported folder that exists now, or the hub
    id (owner/name) of an exported folder, which the loader downloads."""
    if not os.path.exists(path) and not looks_like_hub_id(path):
        raise argparse.ArgumentTypeError(
            f"{path} does not exist (a .pt checkpoint, a folder of export.py, or the hub id owner/name of one)"
        )
    return path


# -----------------------------------------------------------------------------
# Running: expected errors as one line, bugs with their traceback


class UserError(Exception):
    """A mistake the user can fix, raised on purpose where it is found; run_cli prints its message as one line.
    Raise the flavour below that a caller would catch: each is also that built-in type."""


class UserValueError(UserError, ValueError):
    """A bad flag value, malformed data, a checkpoint of the wrong kind."""


class UserIndexError(UserError, IndexError):
    """A reference past the end of what it points into (a row of a dataset)."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named that is not there."""


class UserFileExistsError(UserError, FileExistsError):
    """An output that is already there and may not be replaced."""


class UserOSError(UserError, OSError):
    """What the machine cannot do for the user's input (fetch a model offline)."""


class UserRuntimeError(UserError, RuntimeError):
    """A run that cannot go on as asked (out of GPU memory at any batch, another rank's failure)."""


class UserImportError(UserError, ImportError):
    """A flag that needs a package that is not installed."""


class UserFloatingPointError(UserError, FloatingPointError):
    """Training that diverged (a non-finite loss or gradient)."""


def run_cli(main, args) -> None:
    """main(args) as a command: see the module docstring for what becomes one `error:` line (exit 1). Ctrl-C exits
    130 without a traceback (train.py catches it first to write a snapshot)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        main(args)
        return
    try:
        main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        rank = torchrun_rank()
        if rank and getattr(e, "told_rank_0", False):
            sys.exit(1)  # rank 0 prints it (colintern_launch.ranks_agree)
        print(f"error: {f'rank {rank}: ' if rank else ''}{message}", file=sys.stderr)
        sys.exit(1)


def torchrun_rank() -> int:
    """This process's rank under torchrun; 0 in a plain process."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix (see the module docstring), or None for a bug."""
    if isinstance(error, UserError):
        text = str(error)
        worker = WORKER_ERROR.match(text)
        return one_line(text if worker is None else worker_error_message(text, worker[1]))
    if isinstance(error, OSError) and error.errno is not None and error.filename is not None:
        where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return f"{where}: {error.strerror}"
    return None


def worker_error_message(text: str, type_name: str) -> str:
    """The original message in torch's text of a worker's exception: after the traceback, `[module.]Type: message`."""
    matches = list(re.finditer(rf"^(?:[\w.]+\.)?{type_name}: ", text, re.M))
    return text[matches[-1].end() :] if matches else text


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# -----------------------------------------------------------------------------
# Reporting scores


def metric_label(metric: str) -> str:
    """How eval.py's table and the plots name an mteb metric: 'ndcg_at_5' -> 'nDCG@5', 'recall_at_1' -> 'Recall@1',
    'mrr_at_10' -> 'MRR@10'; a name of another shape as it is."""
    m = re.fullmatch(r"([a-z_]+)_at_(\d+)", metric)
    if m is None:
        return metric
    names = {"ndcg": "nDCG", "recall": "Recall", "mrr": "MRR", "map": "MAP", "precision": "P", "hit_rate": "Hit"}
    return f"{names.get(m[1], m[1])}@{m[2]}"


# -----------------------------------------------------------------------------
# Progress bars


def progress_bar(iterable=None, **kwargs):
    """tqdm on a terminal (or in a notebook); written to a log file or a pipe, plain lines at most every
    LOG_PROGRESS_INTERVAL seconds (or TQDM_MININTERVAL, when set) and the final state, instead of a redraw at every
    update (a training log was mostly carriage-return redraws)."""
    from tqdm.auto import tqdm

    if torchrun_rank():
        kwargs["disable"] = True  # rank 0 shows the run's progress
    out = kwargs.get("file") or sys.stderr
    if "ipykernel" in sys.modules or (hasattr(out, "isatty") and out.isatty()):
        return tqdm(iterable, **kwargs)
    interval = float(os.environ.get("TQDM_MININTERVAL", LOG_PROGRESS_INTERVAL))
    kwargs["mininterval"] = max(kwargs.get("mininterval", 0), interval)
    kwargs.setdefault("ascii", True)
    kwargs.pop("dynamic_ncols", None)
    return _log_lines_class()(iterable, **kwargs)


@functools.cache
def _log_lines_class():
    from tqdm.std import tqdm

    class LogLines(tqdm):
        """A tqdm bar as whole lines: one at the start, at most one per `mininterval`, one at the end."""

        def display(self, msg=None, pos=None):
            if msg == "":  # close() clearing a bar that does not stay: a log has nothing to clear
                return False
            now = self._time()
            if self.disable or now - getattr(self, "_last_line_t", float("-inf")) >= self.mininterval:
                self._last_line_t = now
                self.fp.write((self.__str__() if msg is None else msg) + "\n")
                self.fp.flush()
            return True

        def close(self):
            if not self.disable and self.leave is not False:
                self.disable = True  # as close() sets it: display() then writes this last line whatever the time
                self.display()
                self.disable, self.leave = False, False  # nothing left for close() to write
            super().close()

    return LogLines
