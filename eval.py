"""Evaluate ColIntern on ViDoRe (v1/v2/v3) through MTEB, scoring with exact MaxSim.

    python eval.py --ckpt outputs/run/colintern_heads_epoch1.pt --benchmarks "ViDoRe(v2)" "ViDoRe(v1)" --device cuda:0
    python eval.py --list                                   # ViDoRe benchmarks, their tasks and dataset folders
    python eval.py --ckpt CKPT --tasks VidoreArxivQARetrieval --max_queries 50 --max_pages 200   # quick check
    python eval.py --ckpt CKPT --benchmarks "ViDoRe(v1)" --data_dir /data/vidore     # offline: local hub copies
    python eval.py --ckpt CKPT --local_task outputs/synthetic/eval --out outputs/eval/synthetic.json
    python eval.py --model_id outputs/tiny-internvl --local_task outputs/synthetic/eval   # untrained baseline

The model goes through mteb's own protocol (`mteb.evaluate`, its ViDoRe task classes, its metrics and its result
cache); only the scorer is ours, because mteb's zero-padded MaxSim is not exact. Queries and pages go through
`ColInternProcessor`, the same format as training. Page embeddings are cached by image content within a task, so
ViDoRe v2/v3 encode each page once, not once per language.

mteb's result cache (`--results_dir`) keys results by model name + revision + task; the revision here is
`result_key(...)`: a hash of the weights (checkpoint file, backbone), every setting that changes scores (tiles, model
dtype, ...) and, for local data (`--data_dir`, `--local_task`), the data's files (paths, sizes, modification times).
So new weights, settings or data are always evaluated afresh (a corrected qrels file is re-scored), while an
interrupted run resumes with the tasks (and language subsets) it had finished. Subsampled runs
(`--max_queries/--max_pages`) are cached apart from full runs (mteb's `experiments/` folder).

Private tasks (ViDoRe(v3)'s Telecom and Nuclear: no public dataset) are skipped with one line, and a benchmark's
average is labelled with the tasks it covers ("ViDoRe(v3), 8 of 10 tasks (2 private)"): not the leaderboard's
score. A task that fails is reported and the others still run; the run then exits with status 1.

Offline (`--data_dir DIR`): DIR holds one folder per hub dataset, named by the last part of its hub id (`--list`
prints them), in the hub layout, e.g. from
`hf download mteb/arxivqa_test_subsampled_beir --repo-type dataset --local-dir DIR/arxivqa_test_subsampled_beir`.

Outputs: a printed table (scores x100), `--out` (default `outputs/eval/<revision>.json`) holding
`{"ckpt", "model_id", "revision", "task_revisions", "training_data", "training_datasets", "failed",
"benchmarks": {name: {"label", "tasks_run", "tasks_total", "tasks": {task: {metric: value}},
"subsets": {task: {language: {metric: value}}}, "average": {metric: value}, "skipped": {task: why},
"failed": {task: error}}}, "page_index": {"pool_factor", "rerank", "vectors_per_page", "page_index_bytes", ...}}`
with mteb's 0-1 values, and mteb's per-query rankings under `--predictions_dir/<task revision>[__<experiment>]/`.

Smaller page indexes (`--pool_factor F`, `--rerank N`): pages are pooled right after encoding
(colintern_scoring.pool_page:
Ward clusters, max(1, L // F) renormalised means), queries never; the first stage scores every page's pooled vectors
with exact MaxSim, and with --rerank each query's top N are re-scored with the full vectors, kept in memory.
"""

import argparse
import contextlib
import copy
import difflib
import os
import traceback

from colintern_cli import (
    ArgumentParser,
    UserValueError,
    metric_label,
    one_line,
    run_cli,
)
from colintern_data import (
    check_output,
    datasets_cache_for,
    files_fingerprint,
    write_json,
)
from colintern_launch import add_model_flags, distributed_run, gather_to_all


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("what to evaluate")
    g.add_argument(
        "--list",
        action="store_true",
        help="print the ViDoRe benchmarks mteb knows, their tasks and dataset ids, and exit",
    )
    g.add_argument(
        "--benchmarks",
        nargs="+",
        default=None,
        help='mteb benchmark names, e.g. "ViDoRe(v1)" "ViDoRe(v2)" "ViDoRe(v3)" (see --list)',
    )
    g.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="only these task names (from --benchmarks, or from any ViDoRe benchmark)",
    )
    g.add_argument(
        "--local_task",
        nargs="+",
        default=None,
        help="folder(s) in the ViDoRe v1 hub layout "
        "(corpus/queries/qrels parquet + README configs), evaluated as custom tasks (benchmark 'local')",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir",
        default=None,
        help="load each task's dataset from DATA_DIR/<last part of its hub "
        "id> (a hub-layout copy) instead of the hub, for machines without internet",
    )
    g.add_argument(
        "--max_queries",
        type=int,
        default=None,
        help="evaluate at most this many queries per task and "
        "language (a seeded random subset), for quick checks during training (default: all)",
    )
    g.add_argument(
        "--max_pages",
        type=int,
        default=None,
        help="at most this many pages per task: the relevant "
        "pages of the kept queries (always kept, even past the cap) plus random others (default: all)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the --max_queries/--max_pages subsample and of the untrained baseline's heads",
    )

    g = p.add_argument_group("model")
    add_model_flags(g, ckpt_required=False)
    g.add_argument(
        "--proj_dim",
        type=int,
        default=None,
        help="embedding size of the untrained baseline's heads (default 128); a checkpoint brings its own",
    )
    g.add_argument(
        "--encode_batch_size",
        "--batch_size",
        dest="encode_batch_size",
        type=int,
        default=8,
        help="queries or pages per forward pass",
    )
    g.add_argument(
        "--rerank",
        type=int,
        default=0,
        help="with --pool_factor > 1: re-score each query's top RERANK pages (by pooled MaxSim) with their "
        "full, unpooled vectors, kept in memory beside the pooled ones; those pages rank first. 0: no "
        "re-ranking. Part of the results' key",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--results_dir",
        default="outputs/mteb_cache",
        help="mteb's result cache; finished tasks found here for the same checkpoint are not recomputed",
    )
    g.add_argument("--overwrite", action="store_true", help="recompute every task even if cached")
    g.add_argument(
        "--out", "--out_json", dest="out", default=None, help="summary JSON (default outputs/eval/<revision>.json)"
    )
    g.add_argument(
        "--predictions_dir",
        default=None,
        help="mteb's per-query rankings go to "
        "PREDICTIONS_DIR/<revision>/<task>_predictions.json (default: beside --out)",
    )
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("max_queries", "max_pages", "max_tiles", "encode_batch_size", "proj_dim", "pool_factor", "dim"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be >= 1, got {value}")
    if args.rerank < 0:
        p.error(f"--rerank must be >= 0, got {args.rerank}")
    if args.rerank and args.pool_factor == 1:
        p.error("--rerank re-scores pooled pages with their full vectors: pass --pool_factor > 1 with it")
    if not args.list:
        if args.ckpt is None and args.model_id is None:
            p.error("pass --ckpt CKPT (or --model_id MODEL alone for the untrained baseline)")
        if args.ckpt is not None and args.proj_dim is not None:
            p.error("--proj_dim only applies to the untrained baseline: a checkpoint brings its own")
        if not (args.benchmarks or args.tasks or args.local_task):
            p.error("nothing to evaluate: pass --benchmarks, --tasks or --local_task (see --list)")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # before mteb is imported below: --help and command-line mistakes answer without it

import mteb  # noqa: E402

from colintern_mteb import (  # noqa: E402
    METRICS,
    EncoderSettings,
    dataset_folder_name,
    load_encoder,
    make_local_task,
    point_at_local_copy,
    subsample_on_load,
)

LOCAL_BENCHMARK = "local"


# -----------------------------------------------------------------------------
# Tasks: the ViDoRe benchmarks mteb knows


def vidore_benchmarks() -> dict:
    return {b.name: b for b in mteb.get_benchmarks() if "vidore" in b.name.lower()}


def list_benchmarks() -> str:
    lines = [f"ViDoRe benchmarks known to mteb {mteb.__version__} (--data_dir folder = last part of the dataset id):"]
    for name, bench in vidore_benchmarks().items():
        lines.append(f"\n{name}: {len(bench.tasks)} tasks")
        for task in bench.tasks:
            md = task.metadata
            subsets = "" if task.hf_subsets == ["default"] else f"  subsets: {','.join(task.hf_subsets)}"
            private = "" if md.is_public else "  (private)"
            lines.append(f"  {md.name:<52} {md.main_score:<10} {md.dataset['path']}{subsets}{private}")
    return "\n".join(lines)


def select_tasks(benchmark_names, task_names) -> list:
    """-> [(benchmark name, task)]: every task of the named benchmarks, or only the named tasks (looked up in the
    named benchmarks, else in all ViDoRe benchmarks; grouped under the first benchmark that has them)."""
    known = vidore_benchmarks()
    for name in benchmark_names or []:
        if name not in known:
            raise UserValueError(
                f"--benchmarks: unknown benchmark {name!r}. This mteb knows: "
                f"{', '.join(repr(b) for b in known)} (see python eval.py --list)"
            )
    pool = [(b, known[b]) for b in benchmark_names] if benchmark_names else list(known.items())
    if not task_names:
        return [(b, copy.deepcopy(task)) for b, bench in pool for task in bench.tasks]
    selected = []
    for name in task_names:
        owner = next(((b, t) for b, bench in pool for t in bench.tasks if t.metadata.name == name), None)
        if owner is None:
            valid = sorted({t.metadata.name for _, bench in pool for t in bench.tasks})
            where = f"benchmarks {[b for b, _ in pool]}" if benchmark_names else "the ViDoRe benchmarks"
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "python eval.py --list names them"
            raise UserValueError(f"--tasks: unknown task {name!r} in {where}: {hint} ({len(valid)} tasks there)")
        selected.append((owner[0], copy.deepcopy(owner[1])))
    return selected


def drop_private(groups: list) -> tuple[list, dict]:
    """-> (the public tasks, {task name: why skipped} for the private ones), saying so in one line per benchmark.
    mteb marks a task whose dataset is not public with `metadata.is_public = False` (ViDoRe(v3)'s Telecom and
    Nuclear sets): nobody outside can download them, online or offline."""
    public, skipped = [], {}
    for bench, task in groups:
        if task.metadata.is_public:
            public.append((bench, task))
        else:
            skipped[task.metadata.name] = f"private dataset ({task.metadata.dataset['path']}), not public"
    for bench in dict.fromkeys(b for b, t in groups if t.metadata.name in skipped):
        names = [t.metadata.name for b, t in groups if b == bench and t.metadata.name in skipped]
        print(
            f"{bench}: skipping {len(names)} private task(s) without a public dataset ({', '.join(names)}); "
            f"its average covers the other tasks and is not the leaderboard's {bench} score"
        )
    return public, skipped


# -----------------------------------------------------------------------------
# Results


def task_metrics(result) -> dict:
    """mteb's scores of one task, each metric averaged over its language subsets (as mteb's get_score does)."""
    return {m: float(result.get_score(getter=lambda scores, m=m: scores[m])) for m in METRICS}


def subset_metrics(result) -> dict:
    """{language subset: {metric: value}} of a task with several (ViDoRe v2/v3); {} for a single-subset task."""
    scores = [(split, score) for split, entries in result.scores.items() for score in entries]
    if len(scores) < 2:
        return {}
    prefix = len(result.scores) > 1
    return {
        (f"{split}/" if prefix else "") + score["hf_subset"]: {m: float(score[m]) for m in METRICS}
        for split, score in scores
    }


def summarize(groups: list, results: dict, skipped: dict, failed: dict) -> dict:
    """[(benchmark, task)] (every task selected, private ones too) + {task: TaskResult} + {task: why skipped} +
    {task: error} -> {benchmark: {"label", "tasks_run", "tasks_total", "tasks", "subsets", "average", "skipped",
    "failed"}}. The average is over the tasks that ran; the label says how many of the benchmark's tasks that is."""
    known = vidore_benchmarks()
    out = {}
    for bench, task in groups:
        name = task.metadata.name
        total = len(known[bench].tasks) if bench in known else sum(b == bench for b, _ in groups)
        # the benchmark's own main score, as mteb's task metadata gives it (ViDoRe v1/v2 nDCG@5, v3 nDCG@10)
        main = (known[bench].tasks[0] if bench in known else task).metadata.main_score
        entry = out.setdefault(
            bench,
            {
                "label": bench,
                "main_score": main,
                "tasks_run": 0,
                "tasks_total": total,
                "tasks": {},
                "subsets": {},
                "average": {},
                "skipped": {},
                "failed": {},
            },
        )
        if name in results:
            entry["tasks"][name] = task_metrics(results[name])
            if subsets := subset_metrics(results[name]):
                entry["subsets"][name] = subsets
        elif name in skipped:
            entry["skipped"][name] = skipped[name]
        else:
            entry["failed"][name] = failed.get(name, "no result")
    for bench, entry in out.items():
        tasks = list(entry["tasks"].values())
        entry["tasks_run"] = len(tasks)
        entry["average"] = {m: sum(t[m] for t in tasks) / len(tasks) for m in METRICS} if tasks else {}
        left_out = [
            (len(entry["skipped"]), "private"),
            (len(entry["failed"]), "failed"),
            (entry["tasks_total"] - len(tasks) - len(entry["skipped"]) - len(entry["failed"]), "not selected"),
        ]
        reasons = ", ".join(f"{n} {why}" for n, why in left_out if n)
        entry["label"] = f"{bench}, {len(tasks)} of {entry['tasks_total']} tasks" + (f" ({reasons})" if reasons else "")
    return out


def format_table(benchmarks: dict) -> str:
    rows = [t for e in benchmarks.values() for t in [*e["tasks"], *e["skipped"], *e["failed"]]]
    rows += ["  " + s for e in benchmarks.values() for subsets in e["subsets"].values() for s in subsets]
    width = max(len(r) for r in ["task", "average (99 of 99 tasks)", *rows])
    columns = {m: max(7, len(metric_label(m))) for m in METRICS}
    head = f"{'task':<{width}}  " + "  ".join(f"{metric_label(m):>{w}}" for m, w in columns.items())

    def row(name, metrics):
        return f"{name:<{width}}  " + "  ".join(f"{100 * metrics[m]:{w}.2f}" for m, w in columns.items())

    lines = []
    for bench, entry in benchmarks.items():
        lines += [
            "",
            f"{entry['label']}  (scores x100; main score {metric_label(entry['main_score'])})",
            head,
            "-" * len(head),
        ]
        for task, metrics in entry["tasks"].items():
            lines.append(row(task, metrics))
            lines += [row("  " + subset, m) for subset, m in entry["subsets"].get(task, {}).items()]
        if entry["average"]:
            lines.append(row(f"average ({entry['tasks_run']} of {entry['tasks_total']} tasks)", entry["average"]))
        lines += [f"{task:<{width}}  skipped: {why}; not in the average" for task, why in entry["skipped"].items()]
        lines += [f"{task:<{width}}  FAILED (error below); not in the average" for task in entry["failed"]]
        if entry["average"] and entry["tasks_run"] < entry["tasks_total"] and bench != LOCAL_BENCHMARK:
            lines.append(
                f"the average covers {entry['tasks_run']} of {bench}'s {entry['tasks_total']} tasks: it is "
                f"not the {bench} score, which averages all of them"
            )
    return "\n".join(lines)


class TasksFailed(SystemExit):
    """Raised by main once every other task has run and the summary is written: exit status 1 with a one-line
    message. `summary` holds what main would have returned."""

    def __init__(self, summary: dict):
        failed = summary["failed"]
        super().__init__(
            f"error: {len(failed)} task(s) failed: {'; '.join(f'{t}: {e}' for t, e in failed.items())}"
            f" (the other tasks' results are in the summary)"
        )
        self.summary = summary


# What the hub clients raise when there is no network (requests, httpx, urllib3, huggingface_hub's offline mode),
# by name: which of them a given datasets/hub version raises, and wraps, varies
NO_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "MaxRetryError",
    "NameResolutionError",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "Timeout",
    "ReadTimeout",
}


def cannot_reach_the_hub(error: BaseException) -> bool:
    """Whether `error`, or an error it came from, is the network's (offline, no route, a timeout)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError) or any(c.__name__ in NO_NETWORK_ERRORS for c in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def error_line(error: Exception) -> str:
    return f"{type(error).__name__}: {one_line(str(error))}"


def evaluate_each(
    encoder,
    tasks: list,
    data_fingerprints: dict,
    local_copies: dict,
    cache,
    predictions_root: str,
    overwrite: bool,
    batch_size: int,
) -> tuple[dict, dict, dict]:
    """Run mteb on one task at a time under its own revision (result_key of the model, its settings and the task's
    data), so a failing task loses only itself. A task whose loader reads a --data_dir copy (`local_copies`: {task:
    folder}) runs in that folder's datasets cache (datasets_cache_for): mteb loads the data inside evaluate.
    -> ({task: TaskResult}, {task: error}, {task: ModelMeta})."""
    base = encoder.mteb_model_meta
    results, failed, metas = {}, {}, {}
    for i, task in enumerate(tasks, 1):
        name = task.metadata.name
        meta = base.model_copy(update={"revision": encoder.revision_for(data_fingerprints.get(name))})
        metas[name] = encoder.mteb_model_meta = meta
        print(
            f"[{i}/{len(tasks)}] {name}"
            + (f" (local data, revision {meta.revision})" if name in data_fingerprints else "")
        )
        try:
            with datasets_cache_for(local_copies[name]) if name in local_copies else contextlib.nullcontext():
                outcome = mteb.evaluate(
                    encoder,
                    task,
                    cache=cache,
                    overwrite_strategy="always" if overwrite else "only-missing",
                    encode_kwargs={"batch_size": batch_size, "show_progress_bar": True},
                    prediction_folder=os.path.join(predictions_root, run_name(meta)) if predictions_root else None,
                    co2_tracker=False,
                )
        except Exception as e:
            failed[name] = error_line(e)
            if name not in local_copies and cannot_reach_the_hub(e):  # offline: one line, and what to do
                hub_id = task.metadata.dataset["path"]
                print(
                    f"task {name} failed: its dataset {hub_id} cannot be fetched from the hub (offline?). Copy it "
                    f"on a machine with internet: hf download {hub_id} --repo-type dataset --revision "
                    f"{task.metadata.dataset.get('revision')} --local-dir DIR/{dataset_folder_name(task)}, then "
                    f"pass --data_dir DIR; going on with the other tasks"
                )
            else:
                traceback.print_exc()
                print(f"task {name} failed ({failed[name]}); going on with the other tasks")
            if encoder.world > 1:
                agree_on_task(name, failed, encoder.world)
            continue
        finally:
            encoder.mteb_model_meta = base
        if encoder.world > 1 and not agree_on_task(name, failed, encoder.world):
            continue
        for error in outcome.exceptions or []:  # how mteb reports a private dataset it cannot load
            failed[error.task_name] = one_line(str(error.exception))
        for result in outcome.task_results:
            # read back what mteb stored (it rounds some scores when saving), so a resumed run reports the same
            results[result.task_name] = cache.load_task_result(result.task_name, meta) or result
    return results, failed, metas


def agree_on_task(name: str, failed: dict, world: int) -> bool:
    """After each task under torchrun: whether it succeeded on every rank; a task that failed on one rank counts
    as failed on all, so the ranks move on to the next task together. -> True if it succeeded everywhere."""
    errors = gather_to_all([failed.get(name)], world)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad and name not in failed:
        failed[name] = f"rank {bad[0][0]}: {bad[0][1]}"
        print(f"task {name} failed on rank {bad[0][0]} ({bad[0][1]}); going on with the other tasks")
    return not bad


def read_only_result_cache(results_dir: str):
    """mteb's result cache for ranks other than 0 under torchrun: it reads the cache (so every rank skips the same
    finished tasks) and writes nothing (rank 0 writes)."""

    class ReadOnlyResultCache(mteb.ResultCache):
        def save_to_cache(self, *args, **kwargs):
            return None

    return ReadOnlyResultCache(results_dir)


def run_name(meta) -> str:
    return meta.revision + (f"__{meta.experiment_name}" if meta.experiment_name else "")


# -----------------------------------------------------------------------------
# main: the tasks selected, the encoder loaded, each task evaluated, the summary written


def main(args):
    if args.list:
        print(list_benchmarks())
        return None
    check_output(args.out or os.path.join("outputs", "eval", "summary.json"), "--out")
    check_output(args.results_dir, "--results_dir", "folder")
    if args.predictions_dir:
        check_output(args.predictions_dir, "--predictions_dir", "folder")
    with distributed_run(args.device) as run:
        return evaluate(args, run)


def evaluate(args, run):
    """The evaluation of main, on this rank of `run` (colintern_launch.distributed_run: rank, world, device)."""
    rank, world = run.rank, run.world
    groups = select_tasks(args.benchmarks, args.tasks) if (args.benchmarks or args.tasks) else []
    public, skipped = drop_private(groups)
    data_fingerprints = {}  # task name -> files_fingerprint of its local data (hub data: none)
    local_copies = {}  # task name -> the --data_dir copy its mteb loader reads
    if args.data_dir is not None:
        for _, task in public:
            local_copies[task.metadata.name] = point_at_local_copy(task, args.data_dir)
            data_fingerprints[task.metadata.name] = files_fingerprint(local_copies[task.metadata.name])
    for folder in args.local_task or []:
        task = make_local_task(folder)
        data_fingerprints[task.metadata.name] = files_fingerprint(folder)
        public.append((LOCAL_BENCHMARK, task))
        groups.append((LOCAL_BENCHMARK, task))
    if not public:
        raise UserValueError(f"nothing to evaluate: every task selected is private ({', '.join(skipped)})")
    tasks = list({task.metadata.name: task for _, task in public}.values())  # a task in two benchmarks runs once
    subsample = {k: v for k, v in (("max_queries", args.max_queries), ("max_pages", args.max_pages)) if v}
    if subsample:
        subsample["subsample_seed"] = args.seed
        for task in tasks:
            subsample_on_load(task, args.max_queries, args.max_pages, args.seed)

    encoder = load_encoder(EncoderSettings.from_args(args, run.device), experiment_kwargs=subsample)
    encoder.rank, encoder.world = rank, world
    meta = encoder.mteb_model_meta
    out_json = args.out or os.path.join("outputs", "eval", f"{run_name(meta)}.json")
    predictions_root = args.predictions_dir or os.path.splitext(out_json)[0] + "_predictions"
    print(
        f"model {meta.name} revision {meta.revision}"
        + (f" ({meta.experiment_name})" if subsample else "")
        + f": {len(tasks)} tasks, results cache {args.results_dir}"
    )
    print(
        f"training data ({encoder.lineage_from}): {', '.join(encoder.training_data) or 'none'}; mteb "
        f"training_datasets: {', '.join(sorted(meta.training_datasets)) or 'none (zero-shot)'}"
    )

    cache = mteb.ResultCache(args.results_dir) if rank == 0 else read_only_result_cache(args.results_dir)
    results, failed, metas = evaluate_each(
        encoder,
        tasks,
        data_fingerprints,
        local_copies,
        cache,
        predictions_root if rank == 0 else None,
        args.overwrite,
        args.encode_batch_size,
    )

    benchmarks = summarize(groups, results, skipped, failed)
    print(format_table(benchmarks))
    summary = {
        "ckpt": args.ckpt,
        "model_id": encoder.model.model_id,
        "revision": meta.revision,
        "experiment": meta.experiment_name,
        "task_revisions": {name: m.revision for name, m in metas.items()},
        "training_data": list(encoder.training_data),
        "training_datasets": sorted(meta.training_datasets),
        "failed": failed,
        "benchmarks": benchmarks,
        "page_index": encoder.index_report(),
    }
    if rank == 0:
        write_json(out_json, summary)

    index = summary["page_index"]
    if encoder.pages_encoded or encoder.queries_encoded or encoder.page_cache_hits:
        print(
            f"\npages encoded {encoder.pages_encoded}, served from the page cache {encoder.page_cache_hits}; "
            f"queries encoded {encoder.queries_encoded}"
        )
        print(
            f"page index: pool factor {index['pool_factor']}, rerank {index['rerank']}: "
            f"{index['vectors_per_page']:.1f} vectors per page (unpooled {index['vectors_per_page_unpooled']:.1f}), "
            f"{index['page_index_bytes']} bytes over {index['pages']} pages encoded; timings {index['timings_s']}"
        )
    elif not summary["failed"]:
        print(
            f"\nnothing encoded: every task's results came from mteb's result cache ({args.results_dir}); "
            f"--overwrite recomputes them"
        )
    print(f"summary:     {out_json}")
    folders = sorted({os.path.dirname(cache.get_task_result_path(name, m)) for name, m in metas.items()})
    print(
        f"mteb cache:  {folders[0]}"
        if len(folders) == 1
        else f"mteb cache:  {os.path.join(args.results_dir, 'results', meta.model_name_as_path())} ({len(folders)} "
        f"revision folders: local data is keyed by its files; the summary's task_revisions says which is where)"
    )
    predictions = [
        os.path.join(predictions_root, run_name(metas[t.metadata.name]), t.prediction_file_name) for t in tasks
    ]
    written = [p for p in predictions if os.path.exists(p)]
    print(
        f"predictions: {predictions_root} ({len(written)} of {len(predictions)} tasks; tasks read from the cache "
        f"keep the files of the run that computed them)"
    )
    for name, error in failed.items():
        print(f"FAILED {name}: {error}")
    if failed:
        raise TasksFailed(summary)
    return summary


if __name__ == "__main__":
    run_cli(main, ARGS)
