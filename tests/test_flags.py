"""Flag spellings: one name per thing across the scripts (--out_dir a folder, --out a file, --train_hub the hub
training data, --encode_batch_size eval's forward batch), the older spellings kept as aliases of the same argument,
and every command of the original ColIntern README still parsing as written, to the same values."""

import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_README = os.path.join(ROOT, "..", "shared", "original", "colintern-readme.md")
FLAG = object()  # where the spelling under test goes in an argv below

# (script, canonical spelling, alias, argv with FLAG where either goes; the flag's value follows it)
ALIASES = [
    ("mine_hard_negatives.py", "--out", "--out_jsonl", ["--ckpt", "me/model", "--train_jsonl", "t.jsonl", FLAG, "o"]),
    ("mine_hard_negatives.py", "--train_hub", "--hub_name", ["--ckpt", "me/model", FLAG, "me/data", "--out", "o"]),
    ("eval.py", "--out", "--out_json", ["--ckpt", "me/model", "--local_task", "x", FLAG, "s.json"]),
    ("eval.py", "--encode_batch_size", "--batch_size", ["--ckpt", "me/model", "--local_task", "x", FLAG, "3"]),
    ("make_tiny_model.py", "--out_dir", "--out", [FLAG, "tiny"]),
    ("plot_training_loss.py", "--out", "--output", ["--input", "loss.txt", FLAG, "loss.png"]),
    ("plot_vidore_metrics.py", "--out_dir", "--outdir", ["--inputs", "a.json", "--labels", "A", FLAG, "plots"]),
]
RENAMED = {}  # script -> {alias: canonical spelling}
for _script, _new, _old, _ in ALIASES:
    RENAMED.setdefault(_script, {})[_old] = _new

# The original README's commands (python SCRIPT ... lines, continuation lines joined), as written there;
# train_colintern.py is the trainer's old name (train.py), "..." stands for the flags of an earlier command
ORIGINAL_COMMANDS = [
    (
        "train.py",
        "--model_id OpenGVLab/InternVL3_5-1B-Instruct --train_hub vidore/colpali_train_set "
        "--out_dir ./outputs/colintern_1b_instruct_lora --batch_size 4 --grad_accum 8 --epochs 1 --lr 5e-5 "
        "--device_map cuda:0 --lora --lora_r 32 --lora_alpha 32 --lora_dropout 0.1 --optimizer paged_adamw_8bit",
    ),
    (
        "mine_hard_negatives.py",
        "--model_id OpenGVLab/InternVL3_5-1B-Instruct --ckpt ./outputs/colintern/colintern_heads_epoch1.pt "
        "--hub_name vidore/colpali_train_set --split train --out_jsonl ./outputs/colintern/mined_triples.jsonl "
        "--k 20 --doc_batch 16 --query_batch 64",
    ),
    (
        "train.py",
        "--model_id OpenGVLab/InternVL3_5-1B-Instruct --train_jsonl ./outputs/colintern/mined_triples.jsonl "
        "--out_dir ./outputs/colintern --resume_ckpt ./outputs/colintern/colintern_heads_epoch1.pt "
        "--batch_size 8 --grad_accum 4 --num_workers 8 --prefetch_factor 6 --save_every 2500 --compile_heads "
        "--device_map cuda:0",
    ),
    ("eval.py", "--ckpt outputs/colintern_epoch2/colintern_heads_epoch2.pt --benchmarks ViDoRe(v2) --device cuda:0"),
    (
        "eval.py",
        "--ckpt outputs/colintern_epoch2/colintern_heads_epoch2.pt --benchmarks ViDoRe(v2) ViDoRe(v1) --device cuda:0",
    ),
    (
        "train_colintern.py",
        "--model_id OpenGVLab/InternVL3_5-1B-Instruct --train_jsonl /path/to/train.jsonl --root /path/to "
        "--out_dir ./outputs/colintern --batch_size 4 --grad_accum 8 --epochs 1 --lr 5e-5 --num_workers 8 "
        "--prefetch_factor 6 --save_every 2500 --device_map cuda:0",
    ),
    ("train_colintern.py", "... --resume_ckpt ./outputs/colintern/colintern_heads_step25000.pt"),
    (
        "plot_training_loss.py",
        "--input outputs/colintern/training_loss.txt --output outputs/training_loss.png --smooth 200",
    ),
    (
        "plot_vidore_metrics.py",
        "--inputs outputs/eval_v1.json outputs/eval_v2.json "
        "--labels 'E1 (in-batch)' 'E2 (mined)' --outdir outputs/plots",
    ),
    (
        "mine_hard_negatives.py",
        "--model_id OpenGVLab/InternVL3_5-1B-Instruct --ckpt ./outputs/colintern/colintern_heads_epoch1.pt "
        "--hub_name vidore/colpali_train_set --split train --out_jsonl ./outputs/colintern/mined_triples.jsonl "
        "--k 20 --doc_batch 16 --query_batch 64",
    ),
]
SCRIPT_NOW = {"train_colintern.py": "train.py"}
# The one value of those commands refused as written: a remote-code checkpoint, by its value with a one-line hint
# (test_cli), never by its flag; the same model's HF-native checkpoint stands in
VALUE_NOW = {"OpenGVLab/InternVL3_5-1B-Instruct": "OpenGVLab/InternVL3_5-1B-HF"}


def readme_commands(text: str) -> list:
    """Every `python [-u] SCRIPT.py ...` line of a markdown text (backslash continuations joined), fenced or not:
    [(script, argv)]."""
    joined = re.sub(r"\\\n", " ", text)
    return [(m[1], shlex.split(m[2])) for m in re.finditer(r"^\s*python (?:-u )?(\w+\.py)\b(.*)$", joined, re.M)]


def parse(script: str, argv: list, partial: bool = False):
    """The script's own parser on argv, without the checks parse_args adds where the script has a build_parser
    (they judge values, not spellings); `partial`: its required flags are not (a command with "...")."""
    module = importlib.import_module({"eval.py": "eval"}.get(script, script[:-3]))
    if not hasattr(module, "build_parser"):
        assert not partial
        return module.parse_args(argv)
    parser = module.build_parser()
    if partial:
        for action in parser._actions:
            action.required = False
        for group in parser._mutually_exclusive_groups:
            group.required = False
    return parser.parse_args(argv)


def test_the_original_commands_are_the_original_readme_s():
    """ORIGINAL_COMMANDS is what the original README says (where ../shared/original holds it)."""
    if not os.path.isfile(ORIGINAL_README):
        pytest.skip(f"{ORIGINAL_README} is not beside this checkout")
    with open(ORIGINAL_README, encoding="utf-8") as f:
        found = readme_commands(f.read())
    assert found == [(script, shlex.split(flags)) for script, flags in ORIGINAL_COMMANDS]


@pytest.mark.parametrize(
    "script, flags", ORIGINAL_COMMANDS, ids=[f"{s}:{i}" for i, (s, _) in enumerate(ORIGINAL_COMMANDS)]
)
def test_every_original_command_parses_as_written_to_the_values_of_today_s_spellings(
    tmp_path, monkeypatch, script, flags
):
    monkeypatch.chdir(tmp_path)
    script = SCRIPT_NOW.get(script, script)
    argv = shlex.split(flags)
    partial = argv[0] == "..."
    argv = [VALUE_NOW.get(token, token) for token in argv[partial:]]
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--ckpt", "--resume_ckpt"):  # checked to exist when parsed
            os.makedirs(os.path.dirname(value), exist_ok=True)
            open(value, "wb").close()
    renamed = RENAMED.get(script, {})
    today = [renamed.get(token, token) for token in argv]
    as_written, spelt_today = parse(script, argv, partial), parse(script, today, partial)
    assert vars(as_written) == vars(spelt_today)
    for old, value in zip(argv, argv[1:]):
        if old in renamed:
            assert str(getattr(spelt_today, renamed[old].lstrip("-"))) == value, (old, renamed[old])


def test_every_alias_the_original_commands_use_is_kept():
    used = {(SCRIPT_NOW.get(s, s), t) for s, flags in ORIGINAL_COMMANDS for t in shlex.split(flags)}
    assert {(s, old) for s, _, old, _ in ALIASES} >= {(s, t) for s, t in used if t in RENAMED.get(s, {})}
    assert ("mine_hard_negatives.py", "--hub_name") in used and ("plot_training_loss.py", "--output") in used


@pytest.mark.parametrize("script, new, old, argv", ALIASES, ids=[f"{s}:{old}" for s, _, old, _ in ALIASES])
def test_an_alias_is_the_same_argument_and_help_names_it_after_the_canonical_flag(capsys, script, new, old, argv):
    spelt = {flag: [flag if token is FLAG else token for token in argv] for flag in (new, old)}
    args = parse(script, spelt[new])
    assert vars(args) == vars(parse(script, spelt[old]))
    assert str(getattr(args, new.lstrip("-"))) == argv[argv.index(FLAG) + 1]
    with pytest.raises(SystemExit):
        parse(script, ["--help"])
    assert re.search(rf"  {new} [A-Z_]+, {old} [A-Z_]+\b", capsys.readouterr().out), (script, new, old)


@pytest.mark.parametrize("script", sorted({s for s, *_ in ALIASES} | {"train.py", "export.py"}))
def test_aliases_are_only_the_listed_ones_and_outputs_are_out_or_out_dir(capsys, script):
    """--help's options with two spellings are exactly ALIASES (a new alias is a decision); no option spelt as an
    output other than --out (a file) or --out_dir (a folder) comes first."""
    with pytest.raises(SystemExit):
        parse(script, ["--help"])
    text = capsys.readouterr().out
    pairs = set(re.findall(r"^  (--\w+)(?: [A-Z_]+)?, (--\w+)", text, re.M))
    assert pairs == {(new, old) for s, new, old, _ in ALIASES if s == script}
    first = set(re.findall(r"^  (--\w+)", text, re.M))
    assert {f for f in first if re.match(r"--out", f)} <= {"--out", "--out_dir"}, first
