"""The command-line layer (colintern_cli.py) and every script's use of it: one-line errors without a traceback for the
user's mistakes and with one for bugs, --help that shows every default and loads no heavy library, sparse progress
lines in logs. Subprocesses only where a fresh interpreter is the point (which modules a script imports, its real
entry point); everything else runs in-process through run_cli."""

import ast
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import colintern_checkpoint as ck
import colintern_cli as cli
import colintern_data
import colintern_model as cm
import colintern_scoring as cs
import eval as colintern_eval
import export
import make_synthetic_data
import make_tiny_model
import mine_hard_negatives as mine
import plot_training_loss
import plot_vidore_metrics
import train
from colintern_cli import progress_bar, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [
    "train.py",
    "mine_hard_negatives.py",
    "eval.py",
    "export.py",
    "make_tiny_model.py",
    "plot_training_loss.py",
    "plot_vidore_metrics.py",
    "make_synthetic_data.py",
]
TORCH_FREE = ("plot_training_loss.py", "plot_vidore_metrics.py", "make_synthetic_data.py")
REMOTE_CODE = "OpenGVLab/InternVL3_5-1B"
REMOTE_CODE_LINE = (
    f"error: argument --model_id: '{REMOTE_CODE}' is a remote-code InternVL checkpoint "
    f"(InternVLChatModel); ColIntern needs the HF-native transformers checkpoint: use "
    f"'{REMOTE_CODE}-HF' instead"
)
# command-line mistakes per script (the first one: no flags at all, or one bad value)
FLAG_ERRORS = {
    "train.py": [[], ["--model_id", REMOTE_CODE, "--train_hub", "X", "--out_dir", "Y"]],
    "mine_hard_negatives.py": [[]],
    "eval.py": [[], ["--ckpt", "/nonexistent.pt", "--local_task", "x"]],
    "export.py": [[], ["--ckpt", "/nonexistent.pt", "--out_dir", "x"]],
    "make_tiny_model.py": [[]],
    "plot_training_loss.py": [[]],
    "plot_vidore_metrics.py": [["--inputs", "a.json", "b.json", "--labels", "A", "--outdir", "x"]],
    "make_synthetic_data.py": [["--topics", "1"]],
}

# Runs `SCRIPT --help` and each of its FLAG_ERRORS through the real `__main__` entry (runpy), scripts one after
# another in one interpreter, and reports exit codes, output, the heavy modules loaded so far and, from the parser
# that printed the help, each option: its first flag, how --help names it, the default --help must show
# (HelpFormatter's rule; None: none to show) and its choices. Loaded modules only accumulate, so a script that loads
# one fails its own check and every later one's.
PROBE = r"""
import argparse, contextlib, io, json, runpy, sys
import colintern_cli
HEAVY = ("mteb", "datasets", "transformers", "peft", "faiss", "matplotlib", "torch")
parsers = []
print_help = colintern_cli.ArgumentParser.print_help
colintern_cli.ArgumentParser.print_help = lambda self, file=None: (parsers.append(self), print_help(self, file))

def run(script, argv):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [script, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(),
            "modules": sorted(m for m in HEAVY if m in sys.modules)}

report = {}
for script, errors in json.loads(sys.argv[1]).items():
    report[script] = {"help": run(script, ["--help"]), "errors": [run(script, argv) for argv in errors]}
    formatter = parsers[-1]._get_formatter()
    report[script]["options"] = [
        {"flag": a.option_strings[0], "invocation": formatter._format_action_invocation(a),
         "default": None if a.default is None or a.nargs == 0 or a.default == argparse.SUPPRESS else str(a.default),
         "choices": [str(c) for c in a.choices or ()]}
        for a in parsers[-1]._actions if a.option_strings]
print(json.dumps(report))
"""


def python(*args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        **kwargs,
    )


def mteb_stand_in(folder) -> str:
    """A package `mteb` that knows one benchmark: enough for eval.py up to its benchmark-name check, without the
    10-30 s that importing mteb takes."""
    os.makedirs(folder / "mteb" / "models")
    (folder / "mteb" / "__init__.py").write_text(
        "import types\n__version__ = 'stand-in'\n"
        "def get_benchmarks():\n    return [types.SimpleNamespace(name='ViDoRe(v1)', tasks=[])]\n"
    )
    (folder / "mteb" / "models" / "__init__.py").write_text("")
    (folder / "mteb" / "models" / "abs_encoder.py").write_text("class AbsEncoder:\n    pass\n")
    return str(folder)


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """{name: (returncode, stdout, stderr)} of every subprocess of this module, started together: each spends most
    of its time importing torch. The torch-free scripts are probed in an interpreter of their own."""
    tmp = tmp_path_factory.mktemp("cli")
    groups = [{s: FLAG_ERRORS[s] for s in SCRIPTS if (s in TORCH_FREE) == torch_free} for torch_free in (0, 1)]
    running = {
        "probe": python("-c", PROBE, json.dumps(groups[0])),
        "probe torch-free": python("-c", PROBE, json.dumps(groups[1])),
        "plot: missing input": python(
            "plot_training_loss.py", "--input", "/nonexistent.txt", "--output", str(tmp / "x.png")
        ),
        "eval: unknown benchmark": python(
            "eval.py",
            "--model_id",
            str(tmp),
            "--benchmarks",
            "ViDoRe(v9)",
            env={"PYTHONPATH": os.pathsep.join([mteb_stand_in(tmp / "stand-in"), os.environ.get("PYTHONPATH", "")])},
        ),
    }
    results = {}
    for name, proc in running.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def probed(commands):
    """{script: probe report} (see PROBE)."""
    report = {}
    for name in ("probe", "probe torch-free"):
        code, out, err = commands[name]
        assert code == 0, err[-3000:]
        report.update(json.loads(out))
    return report


def help_entries(text: str) -> dict:
    """--help text -> {option: its whole entry, whitespace collapsed}."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            current = m[1].rstrip(",")
            entries[current] = ""
        elif not line.startswith("   "):
            current = None
        if current:
            entries[current] += " " + line
    return {k: " ".join(v.split()) for k, v in entries.items()}


# -----------------------------------------------------------------------------
# --help and command-line mistakes: fast, light, every default shown


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_option_shows_its_default_and_loads_no_heavy_module(probed, script):
    """Every option of the script's own parser (so a new flag needs no edit here): listed, explained in words, its
    choices named, and its default shown."""
    result = probed[script]["help"]
    assert result["code"] == 0, result["err"]
    allowed = [] if script in TORCH_FREE else ["torch"]
    assert result["modules"] == allowed, f"{script} --help imported {result['modules']}"
    entries = help_entries(result["out"])
    options = probed[script]["options"]
    assert {o["flag"] for o in options} == set(entries), "the parser's options are not the ones --help lists"
    for option in options:
        entry = entries[option["flag"]]
        assert entry.startswith(option["invocation"]), (option, entry)
        explanation = entry[len(option["invocation"]) :]
        if option["default"] is not None:
            shown = rf"\(default:? {re.escape(option['default'])}\)"
            assert re.search(shown, explanation), (option["flag"], option["default"], entry)
            explanation = re.sub(shown, "", explanation)
        assert len(explanation.strip()) > 15, (option["flag"], entry)  # a few words, not just a default
        assert all(choice in entry for choice in option["choices"]), (option["flag"], option["choices"], entry)


@pytest.mark.parametrize("script", SCRIPTS)
def test_flag_mistakes_print_one_error_line_and_a_hint(probed, script):
    allowed = [] if script in TORCH_FREE else ["torch"]
    for result in probed[script]["errors"]:
        lines = result["err"].splitlines()
        assert result["code"] == 2 and result["modules"] == allowed, result
        assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: python "), lines


def test_named_flag_mistakes_say_what_to_do(probed):
    assert probed["train.py"]["errors"][1]["err"].splitlines()[0] == REMOTE_CODE_LINE  # offline, no hub access
    assert (
        probed["eval.py"]["errors"][1]["err"].splitlines()[0]
        == "error: argument --ckpt: /nonexistent.pt does not exist (a .pt checkpoint, a folder of export.py, or the "
        "hub id owner/name of one)"
    )
    assert (
        probed["plot_vidore_metrics.py"]["errors"][0]["err"].splitlines()[0]
        == "error: --labels has 1 labels for 2 --inputs: give one per input"
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_description_keeps_its_example_lines(probed, script):
    """Every line of a script's docstring that ends in a backslash (a shell continuation in an example) reaches
    --help as it is: a non-raw docstring would join it to the next line."""
    text = probed[script]["help"]["out"]
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    docstring = ast.get_source_segment(source, ast.parse(source).body[0])  # as written, backslashes and all
    lines = [x for x in docstring.splitlines() if x.endswith("\\")]
    assert all(line.strip() + "\n" in text for line in lines), (script, lines)


# -----------------------------------------------------------------------------
# Remote-code InternVL ids: refused by name, before any hub access


def test_remote_code_internvl_ids_are_refused_by_name_without_the_hub(monkeypatch, tmp_path, capsys):
    import transformers.utils

    # transformers' modules bind cached_file when first imported: import them now, so that none binds the fake
    # below and keeps it after this test (later tests would then load nothing)
    from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer  # noqa: F401

    for name in (
        "configuration_utils",
        "modeling_utils",
        "processing_utils",
        "tokenization_utils_base",
        "image_processing_base",
        "feature_extraction_utils",
        "video_processing_utils",
        "models.auto.processing_auto",
        "models.auto.image_processing_auto",
        "models.auto.tokenization_auto",
        "models.auto.video_processing_auto",
        "models.auto.feature_extraction_auto",
    ):
        importlib.import_module(f"transformers.{name}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_calls = []

    def cached_file(model_id, *args, **kwargs):
        hub_calls.append(model_id)
        raise OSError("offline")

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)

    for size in ("1B", "2B", "4B", "8B", "14B", "38B"):
        for variant in ("", "-Instruct", "-Pretrained", "-MPO", "-Flash"):
            model_id = f"OpenGVLab/InternVL3_5-{size}{variant}"
            with pytest.raises(ValueError, match=rf"remote-code .* use 'OpenGVLab/InternVL3_5-{size}-HF' instead"):
                cm.read_model_config(model_id)
            with pytest.raises(ValueError, match="remote-code"):
                cm.load_backbone(model_id)
    assert hub_calls == []
    with pytest.raises(OSError, match="could not fetch config.json"):  # an -HF id goes to the hub
        cm.read_model_config("OpenGVLab/InternVL3_5-1B-HF")
    assert hub_calls == ["OpenGVLab/InternVL3_5-1B-HF"]

    # a local folder of that name is judged by its config.json, not its name
    monkeypatch.chdir(tmp_path)
    os.makedirs("OpenGVLab/InternVL3_5-1B")
    with open("OpenGVLab/InternVL3_5-1B/config.json", "w") as f:
        json.dump({"model_type": "internvl"}, f)
    assert cm.read_model_config("OpenGVLab/InternVL3_5-1B")["model_type"] == "internvl"

    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--model_id", "OpenGVLab/InternVL3_5-2B-Instruct", "--train_hub", "X", "--out_dir", "Y"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0].endswith("use 'OpenGVLab/InternVL3_5-2B-HF' instead")


# -----------------------------------------------------------------------------
# Mistakes found while running: one line, exit 1


def run_script(main, args, capsys) -> list:
    """run_cli(main, args) as the `__main__` entry does -> stderr lines; it must exit 1."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


def test_missing_plot_input_through_the_real_entry_point(commands):
    code, out, err = commands["plot: missing input"]
    assert code == 1 and err == "error: --input /nonexistent.txt does not exist\n", err


def test_empty_and_malformed_training_data(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    flags = ["--out_dir", str(tmp_path / "out"), "--num_workers", "0"]
    assert run_script(train.main, train.parse_args(["--train_jsonl", str(empty), *flags]), capsys) == [
        f"error: {empty} has no triples"
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": "a.png"}\n{"query": "q", "pos": \n')
    assert run_script(train.main, train.parse_args(["--train_jsonl", str(bad), *flags]), capsys) == [
        f"error: {bad} line 2: not valid JSON (Expecting value at column 1)"
    ]
    assert run_script(
        train.main, train.parse_args(["--train_jsonl", str(tmp_path / "nowhere.jsonl"), *flags]), capsys
    ) == [f"error: {tmp_path / 'nowhere.jsonl'}: No such file or directory"]


def test_mining_refuses_a_non_checkpoint_before_reading_the_data(tmp_path, capsys, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    monkeypatch.setattr(mine, "hub_input", lambda *a: pytest.fail("the data was read before the checkpoint"))
    args = mine.parse_args(
        ["--ckpt", str(notes), "--hub_name", "vidore/colpali_train_set", "--out_jsonl", str(tmp_path / "o.jsonl")]
    )
    assert run_script(mine.main, args, capsys) == [
        f"error: {notes} is not a ColIntern checkpoint (made by train.py): torch.load cannot read it"
    ]


def test_unknown_benchmark(commands):
    """eval.py's own error through its entry point (mteb stood in for: only the benchmark-name lookup runs)."""
    code, out, err = commands["eval: unknown benchmark"]
    assert code == 1 and err == (
        "error: --benchmarks: unknown benchmark 'ViDoRe(v9)'. This mteb knows: "
        "'ViDoRe(v1)' (see python eval.py --list)\n"
    ), err


# -----------------------------------------------------------------------------
# What run_cli lets through: bugs keep their traceback


def test_bugs_and_library_errors_keep_their_traceback(tmp_path, capsys):
    with pytest.raises(ValueError, match="empty sequence"):  # a bug in project code: max([]), no raise statement
        run_cli(lambda args: cs.pad_pages([]), None)
    with pytest.raises(RuntimeError):  # raised inside torch
        run_cli(lambda args: torch.ones(2) @ torch.ones(3), None)
    with pytest.raises(TypeError, match="page 0 is a int"):  # an explicit raise, but of a misuse of the code
        run_cli(lambda args: cm.ColInternProcessor.process_pages(None, [1]), None)
    with pytest.raises(ValueError):  # raised by a library (PIL), not by the project's own raise statement
        run_cli(lambda args: Image.new("RGB", (1, 1), "no-such-colour"), None)
    assert capsys.readouterr().err == ""


def test_a_plain_raise_is_a_bug_whatever_file_it_is_in(capsys):
    """Only the type decides: a ValueError raised by a plain `raise` statement (here in a script's own code path) is
    a bug and keeps its traceback; the same message as a UserValueError is one line."""

    def plain(args):
        raise ValueError("--flag 3 is out of range")

    def user(args):
        raise cli.UserValueError("--flag 3 is out of range")

    with pytest.raises(ValueError, match="out of range"):
        run_cli(plain, None)
    assert run_script(user, None, capsys) == ["error: --flag 3 is out of range"]
    for flavour, builtin in (
        (cli.UserFileNotFoundError, FileNotFoundError),
        (cli.UserRuntimeError, RuntimeError),
        (cli.UserFloatingPointError, FloatingPointError),
        (cli.UserImportError, ImportError),
    ):
        assert issubclass(flavour, cli.UserError) and issubclass(flavour, builtin)


def test_the_oss_error_for_a_path_is_one_line_wherever_it_was_raised(tmp_path, capsys):
    """os.makedirs runs in Python 3.11's `<frozen os>`, which no check of file locations knew: the OSError it raises
    for a path (errno and filename set) is one line whatever raised it."""
    (tmp_path / "a_file").write_text("not a folder")
    lines = run_script(lambda args: os.makedirs(tmp_path / "a_file" / "out"), None, capsys)
    assert lines == [f"error: {tmp_path / 'a_file' / 'out'}: Not a directory"]


def output_cases(tmp_path):
    """(script module, argv, flag, path): an output under a regular file, or under /proc, for every script that
    writes one, and the flag its error names (the canonical spelling, also where an alias was typed); the other
    inputs exist but are never read."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "dummy.pt").write_bytes(b"never read")
    (tmp_path / "loss.txt").write_text("# step epoch loss lr\n1 1 0.5 1e-3\n")
    (tmp_path / "a_folder").mkdir()
    under_file, ckpt = str(tmp_path / "a_file" / "out"), str(tmp_path / "dummy.pt")
    return [
        (train, ["--train_jsonl", str(tmp_path / "t.jsonl"), "--out_dir", under_file], "--out_dir", under_file),
        (
            mine,
            ["--ckpt", ckpt, "--hub_name", "x/y", "--out_jsonl", under_file + ".jsonl"],  # old spellings: aliases
            "--out",
            under_file + ".jsonl",
        ),
        (
            mine,
            ["--ckpt", ckpt, "--train_hub", "x/y", "--out", str(tmp_path / "a_folder")],
            "--out",
            str(tmp_path / "a_folder"),
        ),
        (
            colintern_eval,
            ["--ckpt", ckpt, "--benchmarks", "ViDoRe(v1)", "--out", under_file + ".json"],
            "--out",
            under_file + ".json",
        ),
        (
            colintern_eval,
            ["--ckpt", ckpt, "--benchmarks", "ViDoRe(v1)", "--results_dir", "/proc/colintern/cache"],
            "--results_dir",
            "/proc/colintern/cache",
        ),
        (
            export,
            ["--ckpt", ckpt, "--out_dir", "/proc/colintern-export", "--name", "me/x"],
            "--out_dir",
            "/proc/colintern-export",
        ),
        (
            plot_training_loss,
            ["--input", str(tmp_path / "loss.txt"), "--out", under_file + ".png"],
            "--out",
            under_file + ".png",
        ),
        (
            plot_vidore_metrics,
            ["--inputs", str(tmp_path / "loss.txt"), "--labels", "a", "--out_dir", under_file],
            "--out_dir",
            under_file,
        ),
        (make_tiny_model, ["--out_dir", under_file], "--out_dir", under_file),
        (make_synthetic_data, ["--out_dir", "/proc/colintern-synthetic"], "--out_dir", "/proc/colintern-synthetic"),
    ]


def test_outputs_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """Every output is checked before a model is loaded or data is read: one line naming the flag and the path as
    typed (an existing folder given for a file, a path under a regular file or under /proc), not a temporary file's
    name after the work. Run as root in CI, where a chmod'ed folder would still be writable."""
    monkeypatch.setattr(ck, "load_checkpoint", lambda *a, **k: pytest.fail("a checkpoint was read first"))
    monkeypatch.setattr(cm.ColIntern, "from_checkpoint", lambda *a, **k: pytest.fail("a model was loaded first"))
    for script, argv, flag, path in output_cases(tmp_path):
        lines = run_script(script.main, script.parse_args(argv), capsys)
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {path}"), (script.__name__, lines)
        assert "is a folder" in lines[0] or "nothing can be written there" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder", "dummy.pt", "loss.txt"]  # nothing left behind


def test_debug_env_keeps_every_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("COLINTERN_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        run_cli(lambda args: ck.load_checkpoint(str(tmp_path / "nope.pt")), None)


def test_ctrl_c_exits_130_without_a_traceback(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted, None)
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


class UndecodablePages(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return colintern_data.open_image(self.path)


def test_error_raised_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    loader = torch.utils.data.DataLoader(UndecodablePages(broken), num_workers=1, collate_fn=list)
    with pytest.raises(cli.UserValueError, match="Caught UserValueError in DataLoader worker process 0"):
        next(iter(loader))  # what torch re-raises: the worker's own type, its traceback as text
    lines = run_script(lambda args: next(iter(loader)), None, capsys)
    assert len(lines) == 1 and re.fullmatch(
        rf"error: image {re.escape(str(broken))} cannot be decoded: "
        rf"cannot identify image file .*",
        lines[0],
    ), lines


# -----------------------------------------------------------------------------
# Entry points and progress bars


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_entry_point_goes_through_run_cli_and_bars_through_progress_bar(script):
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    assert re.search(r'if __name__ == "__main__":\n    run_cli\(main, (parse_args\(\)|ARGS)\)\n*$', source)
    assert not re.search(r"^\s*(from tqdm|import tqdm)", source, re.M)


def test_progress_in_a_log_file_is_a_few_plain_lines(tmp_path, monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        bar = progress_bar(total=300, desc="train", unit="step", dynamic_ncols=True)
        for step in range(300):
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}")  # forces a refresh at every step, as train.py does
            bar.update(1)
        bar.close()
        for _ in progress_bar(range(10_000), desc="encode pages"):
            pass
    text = log.read_text()
    assert "\r" not in text and len(text) < 400, text
    assert text.splitlines()[1].startswith("train: 100%|##########| 300/300") and text.count("\n") == 4, text
