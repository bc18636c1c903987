r"""Export a trained ColIntern as a folder to share on the Hugging Face hub: `hf upload` it as it is.

    python export.py --ckpt outputs/colintern-1b-e2/colintern_heads_epoch2.pt --out_dir outputs/colintern-1b-v1 \
        --name my-org/colintern-1b-v1 --eval_json outputs/eval/E2.json
    hf upload my-org/colintern-1b-v1 outputs/colintern-1b-v1 .
    python eval.py --ckpt outputs/colintern-1b-v1 --benchmarks "ViDoRe(v1)"      # or --ckpt my-org/colintern-1b-v1

The folder holds safetensors, JSON and text only (no pickles, no code), and nothing of the frozen backbone:
    adapter_config.json, adapter_model.safetensors   the LoRA adapter in peft's own files (base_model_name_or_path:
                                                     the backbone id), which PeftModel.from_pretrained also reads
    heads.safetensors                                the query and page heads
    colintern_config.json                            name, backbone, proj_dim, max_tiles, query/page format and its
                                                     version, LoRA settings, step/epoch, training-data lineage: every
                                                     key of the checkpoint's meta
    modules.json, 1_Router/, 2_Normalize/, ...       the same model for sentence-transformers' MultiVectorEncoder:
    chat_template.jinja, tokenizer.json, ...         the backbone's processor with ColIntern's query and page formats
                                                     as its chat template (colintern_st.py lists every file)
    README.md                                        the model card: hub metadata, how to load it, eval.py's scores
    mteb_model_meta.py                               the mteb model registration (ModelMeta, loaded by mteb's
                                                     MultiVectorWrapper) for a leaderboard submission

Load it with `MultiVectorEncoder(folder or hub id)` (sentence-transformers >= 6.0, without this repository), or
`colintern_model.load_trained(folder or hub id)`; eval.py, mine_hard_negatives.py (--ckpt) and train.py
(--resume_ckpt) take the folder wherever they take a .pt. Before the folder appears it is loaded back onto the
backbone it was trained on, so an adapter or heads that do not fit fail here, not on the hub, and its chat template
must render the query and page formats ColInternProcessor makes. Writing goes to a hidden folder beside --out_dir,
renamed into place at the end: a crash leaves nothing half-written.
"""

import datetime
import json
import os
import re
import shutil

from colintern_cli import (
    ArgumentParser,
    UserFileExistsError,
    UserValueError,
    metric_label,
    one_line,
    run_cli,
    trained_model,
)

MODEL_CARD = "README.md"
MTEB_META = "mteb_model_meta.py"
TAGS = [
    "colpali",
    "colintern",
    "late-interaction",
    "visual-document-retrieval",
    "vidore",
    "multimodal",
    "internvl",
    "sentence-transformers",
    "multi-vector",
]
USAGE_QUERY = "Which page shows the revenue?"
USAGE_PAGE = "page.png"
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--ckpt",
        required=True,
        type=trained_model,
        help="the trained model: a .pt checkpoint of "
        "train.py (colintern_heads_epoch2.pt), or an exported folder (to export it again)",
    )
    p.add_argument(
        "--out_dir",
        required=True,
        help="the folder to write (refused if it exists and is not empty, unless --overwrite)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="the model's hub id, owner/name: the repository to upload to, and "
        "the name eval.py and mteb report it under (default: colintern/<--out_dir folder name>)",
    )
    p.add_argument(
        "--base_model",
        default=None,
        help="the backbone's hub id to record (adapter_config.json, model "
        "card), when the checkpoint names a local copy of it (default: the checkpoint's model id)",
    )
    p.add_argument(
        "--eval_json",
        nargs="+",
        default=None,
        help="eval.py summary JSON(s) of this model: their scores go into the model card",
    )
    p.add_argument(
        "--license",
        default=None,
        help="license id for the model card and mteb, e.g. apache-2.0 "
        "(default: a placeholder to fill in; the backbone's license applies to what you build on it)",
    )
    p.add_argument(
        "--revision",
        default=None,
        help="the hub commit of the upload, for mteb's ModelMeta (known "
        "after `hf upload`; default: none, fill it in before submitting)",
    )
    p.add_argument(
        "--dim",
        type=int,
        default=None,
        help="export at this vector size, one of the Matryoshka "
        "prefixes the checkpoint was trained with (train.py --matryoshka_dims): the heads keep their first "
        "DIM outputs, so every loader (ours, sentence-transformers, mteb) encodes the renormalised prefix "
        "and the index is proj_dim / DIM times smaller (default: the full size)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out_dir")
    return p


def at_dim(ckpt: dict, dim: int | None, where: str) -> dict:
    """The checkpoint as a model of vector size `dim`: a Matryoshka prefix it was trained at. Cutting the heads to
    their first `dim` outputs is the prefix itself (each output is its own row of the head), and the normalisation
    after the head then renormalises it: what ColIntern(dim=dim) encodes, up to the matmul's rounding."""
    meta = ckpt["meta"]
    trained = meta.get("matryoshka_dims") or [meta["proj_dim"]]
    if dim is None or dim == meta["proj_dim"]:
        return ckpt
    if dim not in trained:
        raise UserValueError(
            f"--dim {dim}: {where} was trained at {', '.join(map(str, trained))} (its Matryoshka "
            f"prefixes); pick one of them"
        )
    heads = {k: v[:dim].clone() for k, v in ckpt["heads"].items()}  # weight (proj_dim, hidden) rows, bias (proj_dim,)
    meta = dict(meta, proj_dim=dim, matryoshka_dims=[d for d in trained if d <= dim])
    return dict(ckpt, meta=meta, heads=heads)


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.name is None:
        args.name = f"colintern/{os.path.basename(os.path.abspath(args.out_dir))}"
    if not HUB_NAME.fullmatch(args.name):
        p.error(f"--name {args.name!r} is not a hub id owner/name (letters, digits, '-', '_', '.')")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # before torch and mteb are imported below: --help and flag mistakes answer at once

import colintern_mteb  # noqa: E402
from colintern_checkpoint import load_checkpoint, write_exported  # noqa: E402
from colintern_data import check_output, create_beside, follow_umask  # noqa: E402
from colintern_model import PAGE_PROMPT, QUERY_AUGMENTATION_TOKENS, QUERY_PREFIX, ColIntern, ColInternProcessor  # noqa: E402
from colintern_st import check_formats, write_sentence_transformers  # noqa: E402

# -----------------------------------------------------------------------------
# Lineage: hub datasets for the model card, mteb task names for the registration


def hub_datasets(training_data: list) -> tuple[list, list]:
    """-> (hub dataset ids, the other sources: local folders, image files, unrecorded lineage)."""
    hub = [s for s in training_data if HUB_NAME.fullmatch(s) and not os.path.exists(s)]
    return hub, [s for s in training_data if s not in hub]


# -----------------------------------------------------------------------------
# The model card


def yaml_list(values: list) -> str:
    return "".join(f"\n- {json_str(v)}" for v in values) if values else " []"


def json_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML string: quotes and colons stay safe


def eval_tables(summaries: list) -> str:
    """eval.py summary JSONs -> markdown tables (scores x100), one per benchmark: its tasks and their average."""
    metrics = colintern_mteb.METRICS
    lines = []
    for summary in summaries:
        for entry in summary["benchmarks"].values():
            lines += [
                "",
                f"**{entry['label']}** (eval.py revision `{summary['revision']}`)",
                "",
                "| task | " + " | ".join(metric_label(m) for m in metrics) + " |",
                "|---|" + "---|" * len(metrics),
            ]
            rows = list(entry["tasks"].items())
            if entry["average"] and len(rows) > 1:
                rows.append((f"average ({entry['tasks_run']} of {entry['tasks_total']} tasks)", entry["average"]))
            lines += [
                f"| {task} | " + " | ".join(f"{100 * scores[m]:.2f}" for m in metrics) + " |" for task, scores in rows
            ]
    return "\n".join(lines)


def lora_summary(lora: dict | None) -> str:
    if not lora:
        return "none (heads only)"
    return f"r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']} (target modules: adapter_config.json)"


def usage(name: str, proj_dim: int, max_tiles: int) -> list:
    """The card's usage section: sentence-transformers first (load, encode, score), then ColIntern's own loader.
    Every code block runs as written once `name` resolves (tests/test_sentence_transformers.py runs them)."""
    return [
        "## Usage",
        "",
        "With sentence-transformers (>= 6.0, with peft >= 0.20 for the adapter); no code from ColIntern is needed:",
        "",
        "```python",
        "from PIL import Image",
        "from sentence_transformers import MultiVectorEncoder",
        "",
        f'model = MultiVectorEncoder("{name}")',
        f'queries, pages = model.encode_query(["{USAGE_QUERY}"]), model.encode_document([Image.open("{USAGE_PAGE}")])',
        "scores = model.similarity(queries, pages)  # MaxSim, one row per query",
        "```",
        "",
        f"Each query token and each image token of a page becomes a {proj_dim}-d unit vector. ColIntern's formats "
        f"are the folder's chat template (`chat_template.jinja`): a query is `{json_str(QUERY_PREFIX)}` + its text + "
        f"{QUERY_AUGMENTATION_TOKENS} pad tokens, a page `{json_str(PAGE_PROMPT)}` around its image, tiled into at "
        f"most {max_tiles} tiles (+ a thumbnail when tiled; `sentence_bert_config.json`). The modules: Transformer "
        "(InternVL with the LoRA adapter, through peft) -> Router (the query head or the page head) -> Normalize -> "
        "MultiVectorMask (a page keeps its image tokens).",
        "",
        "With the ColIntern repository on the Python path:",
        "",
        "```python",
        "from PIL import Image",
        "from colintern_model import load_trained",
        "from colintern_scoring import maxsim_scores",
        "",
        f'model, processor = load_trained("{name}")',
        f'queries = model.encode_queries(processor, ["{USAGE_QUERY}"])  # list of (query tokens, {proj_dim})',
        f'pages = model.encode_pages(processor, [Image.open("{USAGE_PAGE}")])  # list of (image tokens, {proj_dim})',
        "scores = maxsim_scores(queries, pages)  # (queries, pages)",
        "```",
        "",
        "The adapter is in peft's format: `PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)` loads "
        "it onto the backbone; the heads are in `heads.safetensors` (ColIntern) and `1_Router/` "
        "(sentence-transformers).",
        "",
        f"Evaluate with ColIntern's eval.py (`--ckpt {name}`), or with mteb (>= 2.22): `{MTEB_META}` registers the "
        "model with mteb's `MultiVectorWrapper` as its loader.",
    ]


def model_card(config: dict, args, hub: list, other: list, summaries: list) -> str:
    base = config["model_id"]
    lines = [
        "---",
        f"base_model: {json_str(base)}",
        "library_name: sentence-transformers",
        f"license: {args.license or 'other  # placeholder: set the license of these weights'}",
        "pipeline_tag: visual-document-retrieval",
        f"tags:{yaml_list(TAGS)}",
        f"datasets:{yaml_list(hub)}",
        "---",
        "",
        f"# {config['name']}",
        "",
        f"A ColIntern late-interaction page retriever: the frozen `{base}` backbone with a LoRA adapter on its "
        f"language model and two {config['proj_dim']}-d projection heads (queries, pages). A query scores a "
        f"page by MaxSim: for each query token its best page token, summed.",
        "",
        "| | |",
        "|---|---|",
        f"| backbone | `{base}` |",
        f"| embedding size | {config['proj_dim']} per token |",
        f"| tiles per page | up to {config['max_tiles']} |",
        f"| LoRA | {lora_summary(config['lora'])} |",
        f"| query/page format | version {config['format']['version']} |",
        f"| trained | epoch {config['epoch']}, step {config['step']} |",
        f"| training data | {', '.join(hub) or 'none on the hub'} |",
    ]
    if other:
        lines += [
            "",
            f"Also trained on {len(other)} source(s) that are not hub datasets (local folders or files, "
            f"or lineage not recorded), left out of `datasets:` above.",
        ]
    lines += ["", *usage(config["name"], config["proj_dim"], config["max_tiles"])]
    if summaries:
        lines += ["", "## Evaluation", "", "Scores x100 from ColIntern's eval.py (mteb, exact MaxSim)."]
        lines.append(eval_tables(summaries))
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# The mteb registration


def mteb_registration(meta) -> str:
    """A ModelMeta -> Python source that builds it: paste it into mteb's model implementations, or exec it."""
    variable = re.sub(r"\W", "_", meta.name.split("/")[-1]).lower()
    fields = [
        "name",
        "revision",
        "release_date",
        "languages",
        "n_parameters",
        "memory_usage_mb",
        "max_tokens",
        "embed_dim",
        "license",
        "open_weights",
        "public_training_code",
        "public_training_data",
        "framework",
        "reference",
        "use_instructions",
        "adapted_from",
        "modalities",
        "model_type",
    ]
    body = ["    loader=MultiVectorWrapper,"]
    body += [f"    {field}={getattr(meta, field)!r}," for field in fields]
    body += [
        "    similarity_fn_name=ScoringFunction.MAX_SIM,",
        f"    training_datasets={python_set(meta.training_datasets)},",
    ]
    return "\n".join(
        [
            f'"""mteb model registration of {meta.name} (written by ColIntern\'s export.py).',
            "",
            "For a leaderboard submission, paste this ModelMeta into mteb's model implementations",
            "(mteb/models/model_implementations/), set revision to the hub commit of the upload, and run mteb on the",
            "model. The loader is mteb's MultiVectorWrapper (mteb >= 2.22): it loads the folder with",
            "sentence-transformers' MultiVectorEncoder (>= 6.0); nothing of ColIntern is imported.",
            '"""',
            "from mteb.models.model_meta import ModelMeta, ScoringFunction",
            "from mteb.models.sentence_transformer_wrapper import MultiVectorWrapper",
            "",
            f"{variable} = ModelMeta(",
            *body,
            ")",
            "",
        ]
    )


def python_set(values) -> str:
    return "{" + ", ".join(repr(v) for v in sorted(values)) + "}" if values else "set()"


def check_registration(source: str) -> None:
    """Run the registration as mteb would read it: every field valid, the loader importable."""
    try:
        exec(compile(source, MTEB_META, "exec"), {})
    except ValueError as e:  # pydantic's ValidationError, e.g. a license id mteb does not know
        raise UserValueError(
            f"the mteb registration is not valid: {one_line(str(e))} (--license takes the ids mteb "
            f"knows, lower case, e.g. apache-2.0, mit, cc-by-4.0)"
        ) from e


def registration_meta(folder: str, config: dict, args, trained_on: str):
    """Load the written folder onto the backbone it was trained on, `trained_on` (the check that its files fit; the
    config may name a --base_model hub id instead), and describe it as eval.py does, under the export's name, license
    and revision."""
    model, _, ckpt = ColIntern.from_checkpoint(folder, model_id=trained_on)
    training_data, _ = colintern_mteb.checkpoint_training_data(args.ckpt, ckpt)
    meta = colintern_mteb.build_model_meta(
        model, config["model_id"], args.revision, None, {}, None, training_data, name=config["name"]
    )
    return meta.model_copy(
        update={
            "license": args.license or "not specified",
            "release_date": datetime.date.today().isoformat(),
            "reference": f"https://huggingface.co/{config['name']}",
            "framework": ["Sentence Transformers", "PyTorch", "Transformers"],
        }
    )


# -----------------------------------------------------------------------------
# main: read the checkpoint and the eval summaries, write the folder beside its final place, then rename it


def read_summary(path: str) -> dict:
    try:
        with open(path) as f:
            summary = json.load(f)
    except json.JSONDecodeError as e:
        raise UserValueError(f"--eval_json {path} is not JSON ({e})") from e
    if not isinstance(summary, dict) or "benchmarks" not in summary:
        raise UserValueError(f"--eval_json {path} is not an eval.py summary (no 'benchmarks' entry)")
    return summary


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.isfile(out_dir):
        raise UserFileExistsError(f"--out_dir {out_dir} is a file: pass a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserFileExistsError(
            f"--out_dir {out_dir} exists and is not empty: pass --overwrite to replace it, or another --out_dir"
        )


def main(args):
    check_out_dir(args.out_dir, args.overwrite)
    check_output(args.out_dir, "--out_dir", "beside")  # written as a folder beside it, then renamed
    ckpt = load_checkpoint(args.ckpt)
    meta = ckpt["meta"]
    if meta.get("bidirectional"):
        raise UserValueError(
            f"--ckpt {args.ckpt} was trained with --bidirectional, and the exported folder's "
            "sentence-transformers files would encode it causally (its Transformer module runs the "
            "language model as configured); a bidirectional model cannot be exported yet. Use the .pt "
            "with mine_hard_negatives.py, eval.py and search.py"
        )
    ckpt = at_dim(ckpt, args.dim, f"--ckpt {args.ckpt}")
    meta = ckpt["meta"]
    trained_on = meta["model_id"]  # the backbone
    summaries = [read_summary(path) for path in args.eval_json or []]

    out_dir = os.path.abspath(args.out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = create_beside(out_dir, ".tmp", folder=True)  # 0777 less the umask, as --out_dir itself would be
    try:
        config = write_exported(ckpt, tmp, args.name, base_model=args.base_model)
        write_sentence_transformers(tmp, ckpt, trained_on)
        check_formats(tmp, ColInternProcessor.from_pretrained(trained_on, max_tiles=meta["max_tiles"]))
        registration = registration_meta(tmp, config, args, trained_on)
        hub, other = hub_datasets(config.get("training_data") or [])
        with open(os.path.join(tmp, MODEL_CARD), "w") as f:
            f.write(model_card(config, args, hub, other, summaries))
        source = mteb_registration(registration)
        check_registration(source)
        with open(os.path.join(tmp, MTEB_META), "w") as f:
            f.write(source)
        for folder, _, _ in os.walk(tmp):  # the safetensors files, the Dense heads' in 1_Router/ too: see follow_umask
            follow_umask(folder)
        if os.path.isdir(out_dir):  # empty, or --overwrite: moved aside, replaced, then removed
            old = create_beside(out_dir, ".old", folder=True)
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if looks_local(config["model_id"]):
        print(
            f"note: the backbone is recorded as the local path {config['model_id']}; elsewhere the folder loads "
            f"only with an override (load_trained(..., model_id=...), --model_id), and MultiVectorEncoder takes "
            f"none. Pass --base_model HUB_ID to record the hub id it is a copy of"
        )
    print(f"wrote {out_dir} ({config['name']}):")
    for name in sorted(os.listdir(out_dir)):
        print(
            f"  {name + ('/' if os.path.isdir(os.path.join(out_dir, name)) else ''):<34} "
            f"{tree_bytes(os.path.join(out_dir, name)):>12,} bytes"
        )
    print(f"upload: hf upload {config['name']} {args.out_dir} .")
    print(
        f"mteb:   {os.path.join(args.out_dir, MTEB_META)} registers it as {registration.name} (training_datasets: "
        f"{', '.join(sorted(registration.training_datasets)) or 'none'})"
    )
    return out_dir


def tree_bytes(path: str) -> int:
    """A file's size, or the total of a folder's files."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def looks_local(model_id: str) -> bool:
    return os.path.exists(model_id) or not HUB_NAME.fullmatch(model_id)


if __name__ == "__main__":
    run_cli(main, ARGS)
