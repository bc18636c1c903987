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

What counts as the user's mistake is decided by where the exception was made, not by its type alone (a ValueError
from inside torch or a KeyError from `d[k]` are bugs): it is
  - an exception built by an explicit `raise SomeError(...)` statement in one of this folder's scripts: the
    message was written for the user there (the project's convention: it names the file, line, flag or id and says
    what to do), of a type that reports a condition rather than a misuse of the code (ValueError, LookupError,
    OSError, RuntimeError, FloatingPointError, ImportError; not TypeError, AttributeError or AssertionError);
  - an OSError the operating system raised (errno set) for a call made by these scripts' own code, e.g. `open` of a
    path the user gave, or `os.makedirs` of an --out_dir where nothing may be written;
  - either of those raised in a DataLoader worker process (torch re-raises it with the worker's traceback as text).
"""
import argparse
import functools
import linecache
import os
import re
import sys
import sysconfig

DEBUG_ENV = "COLINTERN_DEBUG"
SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"])
USER_ERROR_TYPES = (ValueError, LookupError, OSError, RuntimeError, FloatingPointError, ImportError)
RAISE_STATEMENT = re.compile(r"\s*raise\s+[A-Za-z_][\w.]*\(")
# How torch re-raises an exception of a DataLoader worker: its type with this message (torch/_utils.py)
WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback", re.S)
WORKER_FRAME = re.compile(r'^  File "([^"]+)", line (\d+), in .*$', re.M)
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
        kwargs.setdefault("epilog", f"A mistake such as a missing file, a bad flag or malformed data prints one "
                                    f"error line; {DEBUG_ENV}=1 shows its traceback.")
        super().__init__(*args, **kwargs)

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
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file" if os.path.isdir(path)
                                         else f"{path} does not exist")
    return path



def trained_model(path: str) -> str:
    """An argparse `type` for a trained ColIntern: a .pt checkpoint or an exported folder that exists now, or the hub
    id (owner/name) of an exported folder, which the loader downloads."""
    from colintern_data import looks_like_hub_id
    if not os.path.exists(path) and not looks_like_hub_id(path):
        raise argparse.ArgumentTypeError(f"{path} does not exist (a .pt checkpoint, a folder of export.py, or the "
                                         f"hub id owner/name of one)")
    return path


# -----------------------------------------------------------------------------
# Running: expected errors as one line, bugs with their traceback

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
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix (see the module docstring), or None for a bug."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    if isinstance(error, OSError) and error.errno is not None:
        caller = next((f for f in reversed(frames) if not in_stdlib(f[0])), None)
        if caller is None or not is_script(caller[0]):
            return None
        where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return f"{where}: {error.strerror}" if where else error.strerror or str(error)
    if not isinstance(error, USER_ERROR_TYPES):
        return None
    worker = WORKER_ERROR.match(str(error))
    if worker is not None and worker[1] == type(error).__name__:
        return worker_error_message(str(error))
    if frames and raised_by_script(*frames[-1]):
        return one_line(error.args[0] if isinstance(error, KeyError) and error.args else str(error))
    return None


def worker_error_message(text: str) -> str | None:
    """The message of a worker's exception from torch's text of it, if one of these scripts raised it."""
    last = None
    for last in WORKER_FRAME.finditer(text):
        pass
    if last is None or not raised_by_script(last[1], int(last[2])):
        return None
    # after the frame: its source line (and caret lines), then `Type: message`
    final = re.search(r"^[A-Za-z_][\w.]*: (.*)", text[last.end():], re.M | re.S)
    return one_line(final[1]) if final else None


def raised_by_script(filename: str, lineno: int) -> bool:
    return is_script(filename) and RAISE_STATEMENT.match(linecache.getline(filename, lineno)) is not None


def is_script(filename: str) -> bool:
    path = os.path.abspath(filename)
    return os.path.dirname(path) == SCRIPTS_DIR and path.endswith(".py")


def in_stdlib(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(STDLIB_DIR + os.sep) and not re.search(r"[/\\](site|dist)-packages[/\\]", path)


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
