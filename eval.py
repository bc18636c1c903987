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
(colintern_model.pool_page:
Ward clusters, max(1, L // F) renormalised means), queries never; the first stage scores every page's pooled vectors
with exact MaxSim, and with --rerank each query's top N are re-scored with the full vectors, kept in memory.
"""

import argparse
import contextlib
import copy
import datetime
import difflib
import hashlib
import json
import os
import random
import time
import traceback

import torch
import torch.nn as nn

import colintern_model
from colintern_cli import (
    ArgumentParser,
    UserFileNotFoundError,
    UserValueError,
    metric_label,
    one_line,
    progress_bar,
    run_cli,
)
from colintern_data import (
    check_output,
    datasets_cache_for,
    files_fingerprint,
    folder_sha256,
    page_hash,
    safe_name,
    write_json,
)
from colintern_launch import add_model_flags, distributed_run, gather_to_all, rank_share, ranks_agree
from colintern_model import ColIntern, dtype_name, index_bytes, matmul_dtype, maxsim_scores, pool_pages, score_identity


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
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402

# The metrics reported, as mteb names them (the table and the plots head them with colintern_cli.metric_label)
METRICS = ["ndcg_at_5", "ndcg_at_10", "recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10"]
LOCAL_BENCHMARK = "local"
HUB_CONFIGS = ("corpus", "queries", "qrels")  # the ViDoRe v1 hub layout, which --local_task reads too
COLPALI_TRAIN_SET = "vidore/colpali_train_set"


# -----------------------------------------------------------------------------
# Identity: what the mteb revision is made of


def model_label(ckpt: str | None, seed: int) -> str:
    """How the mteb revision names the model evaluated, for people (the key after it is what identifies it)."""
    return safe_name(os.path.splitext(os.path.basename(os.path.normpath(ckpt)))[0]) if ckpt else f"untrained-seed{seed}"


def result_key(scores: dict, data_fingerprint: str | None) -> str:
    """The one key cached results are filed under (mteb's model revision): what the scores depend on
    (colintern_model.score_identity: the embeddings' identity, the score dtype, scoring, rerank, dimension) and the
    data (`files_fingerprint` of a local copy; None for hub data, pinned by mteb's task metadata). mteb serves a
    cached result whenever the key matches, so everything that changes scores must be in it."""
    blob = json.dumps({"scores": scores, "data": data_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# hub training sets -> the mteb tasks built from them, as mteb's own model metadata declares them
# (mteb.models.model_implementations.colpali_models.COLPALI_TRAINING_DATA for vidore/colpali_train_set)
MTEB_TRAINING_DATASETS = {
    COLPALI_TRAIN_SET: frozenset(
        {"VidoreDocVQARetrieval", "VidoreInfoVQARetrieval", "VidoreTatdqaRetrieval", "VidoreArxivQARetrieval"}
    )
}


def mteb_training_datasets(sources: list) -> set:
    """Checkpoint lineage -> mteb's training_datasets: known hub sets, by their id or by a local copy's folder name
    (the last part of the id, as --data_dir names copies)."""
    out = set()
    for source in sources:
        for hub_id, tasks in MTEB_TRAINING_DATASETS.items():
            if source == hub_id or os.path.basename(source.rstrip("/")) == hub_id.split("/")[-1]:
                out |= tasks
    return out


def checkpoint_training_data(ckpt: str | None, ckpt_dict: dict | None) -> tuple[list, str]:
    """-> (the datasets the weights were trained on, where that comes from): the lineage train.py records in the
    checkpoint; none for untrained heads or a checkpoint that records none."""
    if ckpt_dict is None:
        return [], "untrained heads"
    recorded = ckpt_dict["meta"].get("training_data")
    if recorded is None:
        return [], "not recorded in the checkpoint"
    return list(recorded), "checkpoint lineage"


def page_key(image) -> str:
    """Content hash of a page image: the cache key that lets language subsets share page embeddings."""
    if not hasattr(image, "tobytes"):
        raise TypeError(f"page is a {type(image).__name__}, not a PIL image")
    return page_hash(f"{image.mode}:{image.size}".encode(), image.tobytes())


# -----------------------------------------------------------------------------
# Exact MaxSim over whatever mteb hands the scorer


def as_multivectors(x) -> list:
    """mteb passes back what encode returned (a list of (L, D) tensors), or, when reranking, a padded (N, L, D)
    tensor. All-zero rows are padding (real tokens are unit vectors) and are dropped, so padding never wins a max."""
    if isinstance(x, (list, tuple)):
        return [torch.as_tensor(t) for t in x]
    x = torch.as_tensor(x)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise UserValueError(
            f"expected multi-vector embeddings (N, L, D) or a list of (L, D), got shape {tuple(x.shape)}"
        )
    return [t[t.abs().sum(dim=-1) > 0] for t in x]


def exact_maxsim(queries, pages, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """(Nq, Np) exact MaxSim scores: for each query token its best page token, summed (in `dtype`, the score
    dtype: see colintern_model.score_dtype)."""
    return maxsim_scores(as_multivectors(queries), as_multivectors(pages), device=device, dtype=dtype)


# -----------------------------------------------------------------------------
# The MTEB model


class ColInternEncoder(AbsEncoder):
    """mteb encoder protocol around ColIntern: queries and pages in the training format, exact MaxSim scoring, and
    page embeddings cached by image content within a task (language subsets of one task share their pages). With
    pool_factor > 1 the cache holds pooled pages, and with rerank their full vectors too (see similarity)."""

    def __init__(
        self,
        model: ColIntern,
        processor,
        model_meta,
        device="cpu",
        result_identity=None,
        training_data=((), ""),
        score_dtype=torch.float32,
        pool_factor=1,
        rerank=0,
    ):
        self.model = model
        self.processor = processor
        self.mteb_model_meta = model_meta
        self.device = device
        self.score_dtype = score_dtype  # what similarity() and similarity_pairwise() score in
        self.result_identity = result_identity  # (label, score identity): see result_key
        self.training_data, self.lineage_from = training_data  # see checkpoint_training_data
        self.page_cache = {}  # page_key -> (Lp, D) float32 CPU tensor (pooled with pool_factor > 1)
        self.pool_factor, self.rerank = pool_factor, rerank
        self.full_pages = {}  # with rerank: id(pooled page in page_cache) -> its full (Lp, D) vectors
        self.index = {
            "pages": 0,
            "vectors": 0,
            "full_vectors": 0,
            "bytes": 0,
            "full_bytes": 0,
            "pooling_s": 0.0,
            "first_stage_s": 0.0,
            "rerank_s": 0.0,
        }  # see index_report
        self._cache_task = None
        self.pages_encoded = 0
        self.page_cache_hits = 0
        self.queries_encoded = 0
        self.rank, self.world = 0, 1  # under torchrun: set by main

    def revision_for(self, data_fingerprint: str | None) -> str:
        """The mteb revision of results on data with this fingerprint (None: hub data)."""
        label, scores = self.result_identity
        return f"{label}-{result_key(scores, data_fingerprint)}"

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        from mteb.types import PromptType

        columns = inputs.dataset.column_names
        if prompt_type is None:  # non-retrieval task types: decide by the data
            prompt_type = PromptType.document if "image" in columns else PromptType.query
        where = f"{task_metadata.name} {hf_subset}"
        show = kwargs.get("show_progress_bar", True)
        if prompt_type == PromptType.query:
            if "text" not in columns:
                raise UserValueError(f"task {task_metadata.name} gives queries without a 'text' column ({columns})")
            return self._encode_queries(inputs, where, show)
        if "image" not in columns:
            raise UserValueError(
                f"task {task_metadata.name} gives documents without an 'image' column ({columns}): "
                f"ColIntern retrieves page images"
            )
        if task_metadata.name != self._cache_task:  # pages are shared within a task; bound memory to one task
            self.page_cache.clear()
            self.full_pages.clear()
            self._cache_task = task_metadata.name
        return self._encode_pages(inputs, where, show)

    def _encode_queries(self, loader, where, show) -> list:
        """Under torchrun each rank encodes a contiguous share of mteb's batches, each batch exactly as one process
        does, and every rank gets all embeddings back in order (mteb runs the same steps on every rank)."""
        out = []
        share = rank_share(len(loader), self.rank, self.world)
        with ranks_agree(f"encoding queries of {where}", self.world):
            for b, batch in enumerate(
                progress_bar(loader, desc=f"queries {where}", unit="batch", disable=not show or self.rank != 0)
            ):
                texts = list(batch["text"])
                if b in share:
                    out.extend(self.model.encode_queries(self.processor, texts, batch_size=len(texts)))
                self.queries_encoded += len(texts)
        return gather_to_all(out, self.world)

    def _encode_pages(self, loader, where, show) -> list:
        """Each batch's pages not in the page cache are encoded together. Under torchrun a first pass over mteb's
        loader finds those groups (as one process would meet them), the ranks encode a contiguous share of the
        groups, each group in one forward as in one process, and every rank gets all embeddings back."""
        if self.world > 1:
            known, groups = set(self.page_cache), []  # groups: (batch index, keys encoded there)
            for b, batch in enumerate(loader):
                missing = list(dict.fromkeys(k for k in map(page_key, batch["image"]) if k not in known))
                known.update(missing)
                if missing:
                    groups.append((b, missing))
            share = [groups[g] for g in rank_share(len(groups), self.rank, self.world)]
            own = []
            with ranks_agree(f"encoding pages of {where}", self.world):
                todo = dict(share)
                for b, batch in enumerate(
                    progress_bar(loader, desc=f"pages {where}", unit="batch", disable=not show or self.rank != 0)
                ):
                    if b in todo:
                        by_key = {k: im for k, im in zip(map(page_key, batch["image"]), batch["image"])}
                        images = [by_key[k] for k in todo[b]]
                        own.extend(self.model.encode_pages(self.processor, images, batch_size=len(images)))
            keys = [k for _, missing in groups for k in missing]
            # pooled after the gather, on every rank alike (pooling is deterministic): rerank keeps each pooled
            # page's own full vectors
            self.page_cache.update(zip(keys, self._pool(gather_to_all(own, self.world))))
            self.pages_encoded += len(keys)
            self.page_cache_hits -= len(keys)  # the pass below finds them in the cache: not hits of the task's data
        out = []
        bar = progress_bar(loader, desc=f"pages {where}", unit="batch", disable=not show or self.world > 1)
        for batch in bar:
            keys = [page_key(im) for im in batch["image"]]
            missing = {}
            for key, image in zip(keys, batch["image"]):
                if key not in self.page_cache and key not in missing:
                    missing[key] = image
            if missing:
                embeddings = self.model.encode_pages(self.processor, list(missing.values()), batch_size=len(missing))
                self.page_cache.update(zip(missing, self._pool(embeddings)))
                self.pages_encoded += len(missing)
            self.page_cache_hits += len(keys) - len(missing)
            out.extend(self.page_cache[key] for key in keys)
            bar.set_postfix(encoded=self.pages_encoded, from_cache=self.page_cache_hits)
        return out

    def _pool(self, pages: list) -> list:
        """The page vectors the first stage scores: pooled with pool_factor > 1, the full ones kept for rerank."""
        start = time.perf_counter()
        pooled = pool_pages(pages, self.pool_factor)
        self.index["pooling_s"] += time.perf_counter() - start
        if self.rerank:
            self.full_pages.update((id(p), full) for p, full in zip(pooled, pages))
        self.index["pages"] += len(pages)
        self.index["vectors"] += sum(len(p) for p in pooled)
        self.index["full_vectors"] += sum(len(p) for p in pages)
        self.index["bytes"] += index_bytes(pooled)
        self.index["full_bytes"] += index_bytes(pages)
        return pooled

    def index_report(self) -> dict:
        """What the summary JSON records of the page index: the pool factor and rerank depth, the pages this run
        encoded (results served from mteb's cache encode none), mean vectors per page pooled and unpooled, the bytes
        the first stage holds (pooled fp32 vectors; with --rerank the full ones are held too, full_bytes), and the
        seconds spent pooling and scoring."""
        i, n = self.index, max(1, self.index["pages"])
        return {
            "pool_factor": self.pool_factor,
            "rerank": self.rerank,
            "pages": i["pages"],
            "vectors_per_page": i["vectors"] / n,
            "vectors_per_page_unpooled": i["full_vectors"] / n,
            "page_index_bytes": i["bytes"],
            "full_bytes": i["full_bytes"],
            "full_vectors_kept": "in memory" if self.rerank else "no",
            "timings_s": {k: round(i[k], 3) for k in ("pooling_s", "first_stage_s", "rerank_s")},
        }

    def similarity(self, embeddings1, embeddings2):
        start = time.perf_counter()
        queries, pages = as_multivectors(embeddings1), as_multivectors(embeddings2)
        scores = maxsim_scores(queries, pages, device=self.device, dtype=self.score_dtype)
        self.index["first_stage_s"] += time.perf_counter() - start
        if self.rerank and self.full_pages:
            start = time.perf_counter()
            scores = self._rerank(queries, pages, scores)
            self.index["rerank_s"] += time.perf_counter() - start
        return scores

    def _rerank(self, queries: list, pages: list, scores: torch.Tensor) -> torch.Tensor:
        """Each query's top `rerank` pages by pooled score, re-scored with their full vectors. They keep the exact
        full MaxSim; every other page drops by 2 Lq + 1 (Lq: the query's tokens), below any score a page of unit
        vectors can reach, so the re-scored pages rank first and mteb's top-k sees the two-stage ranking."""
        full = [self.full_pages.get(id(p), p) for p in pages]
        top = scores.topk(min(self.rerank, len(pages)), dim=1).indices  # (Nq, N)
        out = scores - torch.tensor([2.0 * len(q) + 1 for q in queries], dtype=scores.dtype)[:, None]
        query_of = torch.arange(len(queries))[:, None].expand_as(top).reshape(-1)
        page_of = top.reshape(-1)
        for page in page_of.unique().tolist():  # each page meets the queries that kept it in one scoring call
            mine = query_of[page_of == page]
            out[mine, page] = maxsim_scores(
                [queries[q] for q in mine.tolist()], [full[page]], device=self.device, dtype=self.score_dtype
            )[:, 0].to(out.dtype)
        return out

    def similarity_pairwise(self, embeddings1, embeddings2):
        a, b = as_multivectors(embeddings1), as_multivectors(embeddings2)
        if len(a) != len(b):
            raise UserValueError(f"similarity_pairwise needs as many queries as pages, got {len(a)} and {len(b)}")
        return torch.stack(
            [maxsim_scores([q], [p], device=self.device, dtype=self.score_dtype)[0, 0] for q, p in zip(a, b)]
        )


def build_model_meta(
    model: ColIntern,
    model_id: str,
    revision: str,
    ckpt: str | None,
    loader_kwargs: dict,
    experiment_kwargs: dict | None,
    training_data: list,
    name: str | None = None,
):
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    on_colpali = bool(mteb_training_datasets(training_data) & MTEB_TRAINING_DATASETS[COLPALI_TRAIN_SET])
    stamp = os.path.getmtime(ckpt) if ckpt and os.path.exists(ckpt) else datetime.datetime.now().timestamp()
    text_config = model.backbone.config.text_config
    return ModelMeta(
        loader=load_encoder,
        loader_kwargs=loader_kwargs,
        name=name or f"colintern/{os.path.basename(model_id.rstrip('/'))}",
        revision=revision,
        release_date=datetime.date.fromtimestamp(stamp).isoformat(),
        languages=["eng-Latn"],
        n_parameters=n_params,
        memory_usage_mb=round(n_bytes / 2**20, 1),
        max_tokens=getattr(text_config, "max_position_embeddings", None),
        embed_dim=model.dim,
        license="not specified",
        open_weights=True,
        public_training_code=None,
        public_training_data=f"https://huggingface.co/datasets/{COLPALI_TRAIN_SET}" if on_colpali else None,
        framework=["PyTorch", "Transformers"],
        reference=None,
        similarity_fn_name=ScoringFunction.MAX_SIM,
        use_instructions=True,
        training_datasets=mteb_training_datasets(training_data),
        adapted_from=model_id,
        modalities=["image", "text"],
        model_type=["late-interaction"],
        experiment_kwargs=experiment_kwargs or None,
    )


def baseline_heads(model: ColIntern, seed: int) -> None:
    """The untrained baseline's heads, drawn from the seed alone (whatever random numbers loading the backbone
    consumed) on the CPU generator and then moved, so that a seed gives the same heads on a CPU and on a GPU (whose
    own generator draws other numbers): the result key counts the device as score-neutral."""
    torch.manual_seed(seed)
    for head in (model.query_head, model.page_head):
        drawn = nn.Linear(head.in_features, head.out_features)  # on the CPU, as nn.Linear draws by default
        with torch.no_grad():
            head.weight.copy_(drawn.weight)
            head.bias.copy_(drawn.bias)


def load_encoder(
    model_name: str | None = None,
    revision: str | None = None,
    *,
    ckpt: str | None = None,
    model_id: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    max_tiles: int | None = None,
    seed: int = 0,
    proj_dim: int = 128,
    experiment_kwargs: dict | None = None,
    score_dtype: str = "fp32",
    quantize: str | None = None,
    pool_factor: int = 1,
    rerank: int = 0,
    attn_implementation: str = "sdpa",
    dim: int | None = None,
) -> ColInternEncoder:
    """The ModelMeta loader: a checkpoint (heads + LoRA on its backbone, or on `model_id`), or with no checkpoint
    the untrained baseline (seeded random heads, no LoRA) on `model_id`. `score_dtype` (fp32, bf16, auto): the
    dtype MaxSim scores in, resolved here and kept resolved in the loader keywords (so in the result key).
    `quantize` None: the checkpoint's, or none without one; the result key holds the quantisation used, so either
    spelling of it shares results. `pool_factor` and `rerank`: see ColInternEncoder.similarity. The result key is
    colintern_model.score_identity of what was loaded."""
    scoring = colintern_model.score_dtype(score_dtype, device)  # the flag's value -> a dtype
    print(
        f"score dtype {dtype_name(scoring)} (--score_dtype {score_dtype}; multiplied in "
        f"{dtype_name(matmul_dtype(scoring, device))} on {device})"
    )
    device_map = None if device == "cpu" else device
    if ckpt is not None:
        model, processor, ckpt_dict = ColIntern.from_checkpoint(
            ckpt,
            model_id=model_id,
            dtype=dtype,
            device_map=device_map,
            max_tiles=max_tiles,
            quantize=quantize,
            attn_implementation=attn_implementation,
            dim=dim,
        )
        model_id = model.model_id
    else:
        ckpt_dict = None
        if model_id is None:
            raise UserValueError("pass --ckpt CKPT, or --model_id MODEL alone for the untrained baseline")
        model, processor = ColIntern.from_pretrained(
            model_id,
            proj_dim=proj_dim,
            lora=None,
            max_tiles=max_tiles or 4,
            dtype=dtype,
            device_map=device_map,
            quantize=quantize or "none",
            attn_implementation=attn_implementation,
            dim=dim,
        )
        baseline_heads(model, seed)
    loader_kwargs = {
        "ckpt": ckpt,
        "model_id": model_id,
        "device": device,
        "dtype": dtype,
        "max_tiles": model.max_tiles,
        "seed": seed,
        "proj_dim": model.proj_dim,
        "score_dtype": dtype_name(scoring),
        "quantize": model.quantize,
        "pool_factor": pool_factor,
        "rerank": rerank,
        "attn_implementation": attn_implementation,
        "dim": model.dim,
    }
    scores = score_identity(model.embedding_identity(pool_factor), scoring, device, rerank)
    training_data, lineage_from = checkpoint_training_data(ckpt, ckpt_dict)
    encoder = ColInternEncoder(
        model.eval(),
        processor,
        None,
        device=device,
        result_identity=(model_label(ckpt, seed), scores),
        training_data=(training_data, lineage_from),
        score_dtype=scoring,
        pool_factor=pool_factor,
        rerank=rerank,
    )
    encoder.mteb_model_meta = build_model_meta(
        model,
        model_id,
        encoder.revision_for(None),
        ckpt,
        loader_kwargs,
        experiment_kwargs,
        training_data,
        name=ckpt_dict and ckpt_dict["meta"].get("name"),
    )  # export.py's
    return encoder


# -----------------------------------------------------------------------------
# Tasks: ViDoRe benchmarks, local hub copies, custom local folders


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


def dataset_folder_name(task) -> str:
    return task.metadata.dataset["path"].rstrip("/").split("/")[-1]


def required_configs(task) -> list:
    """The dataset configs a task's loader reads, as alternatives: [("corpus",), ("queries", "query"), ...]."""
    if not uses_generic_retrieval_loader(task):
        return [(c,) for c in HUB_CONFIGS]  # the ViDoRe v1/v2 loaders read these three configs, split by split
    if not task.metadata.is_multilingual:  # mteb's generic loader (ViDoRe v3)
        return [("corpus",), ("queries", "query"), ("qrels", "default")]
    return [c for s in task.hf_subsets for c in ((f"{s}-corpus",), (f"{s}-queries", "query"), (f"{s}-qrels",))]


def check_hub_layout(folder: str, configs: list, splits, what: str, hint: str = "") -> None:
    """Raise, naming the config and the path, unless `folder` holds every data file the loader will read: each
    config in README.md's `configs:` block, each split's files on disk, as many rows as its `dataset_info` says.
    datasets reads split names from the README without touching the files, so a partial download (only the English
    configs, a missing shard) would pass its checks and die mid-evaluation."""
    from datasets.data_files import resolve_pattern, sanitize_patterns

    card = read_card(folder)
    declared = {c.get("config_name", "default"): c for c in card.get("configs") or []}
    missing = [" or ".join(alts) for alts in configs if not any(c in declared for c in alts)]
    if missing:
        raise UserValueError(
            f"{what}: {folder} lacks the dataset configs {missing} (it has {list(declared)}). It "
            "needs "
            "the hub layout: a README.md whose `configs:` block maps each config to its parquet "
            "files "
            f"(e.g. corpus -> corpus/test-*.parquet), as `hf download ... --repo-type dataset` gives"
        )
    rows = expected_rows(card)
    absent, short = [], []
    for alts in configs:
        config = next(c for c in alts if c in declared)
        if "data_files" not in declared[config]:
            continue  # a data_dir config: datasets finds its files itself
        have = sanitize_patterns(declared[config]["data_files"])
        lacking = [s for s in splits if s not in have]
        if lacking:
            raise UserValueError(f"{what}: {folder} config {config!r} has splits {list(have)}, not {lacking}")
        for split in splits:
            files = []
            for pattern in have[split]:
                try:
                    files += resolve_pattern(pattern, folder)
                except FileNotFoundError:
                    absent.append(f"{config!r} ({pattern})")
            found = parquet_rows(files)
            if files and found is not None and rows.get((config, split), found) != found:
                short.append(
                    f"{config!r} split {split!r} has {found} of the {rows[(config, split)]} rows its "
                    f"README lists ({len(files)} file(s))"
                )
    if absent:
        raise UserFileNotFoundError(
            f"{what}: {folder} is incomplete: its README.md lists data files that are not "
            "there "
            f"(paths under the folder), for config {', '.join(absent[:6])}"
            + (f" and {len(absent) - 6} more" if len(absent) > 6 else "")
            + f". {hint or 'Copy the missing files.'}"
        )
    if short:
        raise UserValueError(f"{what}: {folder} is incomplete: {'; '.join(short)}. {hint or 'Copy the missing files.'}")


def read_card(folder: str) -> dict:
    """The YAML header of a dataset folder's README.md ({} without one)."""
    from huggingface_hub.repocard import metadata_load

    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return {}
    try:
        return metadata_load(path) or {}
    except Exception as e:
        raise UserValueError(f"{path}: its YAML header cannot be read ({type(e).__name__}: {e})") from e


def expected_rows(card: dict) -> dict:
    """{(config, split): rows} from a README's `dataset_info` (one dict, or a list with config names)."""
    infos = card.get("dataset_info") or []
    infos = [infos] if isinstance(infos, dict) else infos
    return {
        (info.get("config_name", "default"), split["name"]): split["num_examples"]
        for info in infos
        for split in info.get("splits") or []
        if "num_examples" in split
    }


def parquet_rows(files: list) -> int | None:
    """Rows in these parquet files, from their footers (None unless all are parquet)."""
    if not files or not all(f.endswith(".parquet") for f in files):
        return None
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def point_at_local_copy(task, data_dir: str) -> str:
    """Make `task` load its dataset from `data_dir/<last part of its hub id>`, checked first; -> that folder (whose
    datasets cache evaluate_each runs the task in)."""
    hub_id = task.metadata.dataset["path"]
    folder = os.path.join(data_dir, dataset_folder_name(task))
    if not os.path.isdir(folder):
        raise UserFileNotFoundError(
            f"--data_dir {data_dir}: task {task.metadata.name} expects its dataset in {folder} (a copy of {hub_id}), "
            f"which does not exist. Get it with: hf download {hub_id} --repo-type dataset "
            f"--revision {task.metadata.dataset.get('revision')} --local-dir {folder}"
        )
    check_hub_layout(
        folder,
        required_configs(task),
        task.eval_splits,
        f"task {task.metadata.name}",
        hint=f"Get them with: hf download {hub_id} --repo-type dataset "
        f"--revision {task.metadata.dataset.get('revision')} --local-dir {folder}",
    )
    read_dataset_from(task, folder)
    return folder


def make_local_task(folder: str):
    """A retrieval task over a folder in the ViDoRe v1 hub layout (corpus/queries/qrels configs, split test).

    Its name carries a fingerprint of the folder's files, so mteb's cache never reports scores of other data. The
    task follows mteb's pattern for custom tasks: an AbsTaskRetrieval subclass with `metadata = TaskMetadata(...)` on
    the class (mteb's unload_data drops metadata set on an instance), so each folder gets a class of its own. mteb's
    generic loader does not read this layout (it wants `id`/`text` columns): the class brings its own loader, as
    mteb's ViDoRe v1 tasks do."""
    from mteb.abstasks import AbsTaskRetrieval

    if not os.path.isdir(folder):
        raise UserFileNotFoundError(f"--local_task {folder} does not exist")
    check_hub_layout(folder, [(c,) for c in HUB_CONFIGS], ["test"], f"--local_task {folder}")
    fingerprint = folder_sha256(folder)
    base = safe_name(os.path.basename(os.path.abspath(folder)))
    folder_metadata = mteb.TaskMetadata(
        name=f"{base}@{fingerprint[:8]}",
        description=f"Page retrieval on the local folder {os.path.abspath(folder)}",
        dataset={"path": os.path.abspath(folder), "revision": fingerprint},
        type="DocumentUnderstanding",
        category="t2i",
        modalities=["text", "image"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_5",
        task_subtypes=["Image Text Retrieval"],
    )

    class LocalPageRetrieval(AbsTaskRetrieval):
        metadata = folder_metadata

        def load_data(self, num_proc=None, **kwargs):
            if self.data_loaded:
                return
            self.dataset = {"default": {"test": load_hub_layout(self.metadata.dataset["path"], "test")}}
            self.data_loaded = True

    return LocalPageRetrieval()


def load_hub_layout(folder: str, split: str) -> dict:
    """corpus/queries/qrels configs of a hub-layout folder -> one split of a retrieval task's data as mteb holds it
    ({"corpus", "queries", "relevant_docs", "top_ranked"}), ids as mteb's ViDoRe loaders write them."""
    import datasets

    with datasets_cache_for(folder):
        parts = {c: datasets.load_dataset(folder, c, split=split) for c in HUB_CONFIGS}
    for config, columns in (
        ("corpus", ["corpus-id", "image"]),
        ("queries", ["query-id", "query"]),
        ("qrels", ["query-id", "corpus-id", "score"]),
    ):
        lacking = [c for c in columns if c not in parts[config].column_names]
        if lacking:
            raise UserValueError(
                f"{folder} config {config!r} lacks columns {lacking} (has {parts[config].column_names})"
            )
    corpus = parts["corpus"].map(lambda x: {"id": f"corpus-{split}-{x['corpus-id']}"}).select_columns(["id", "image"])
    queries = parts["queries"].map(lambda x: {"id": f"query-{split}-{x['query-id']}", "text": x["query"]})
    relevant = {}
    for row in parts["qrels"]:
        relevant.setdefault(f"query-{split}-{row['query-id']}", {})[f"corpus-{split}-{row['corpus-id']}"] = int(
            row["score"]
        )
    return {
        "corpus": corpus,
        "queries": queries.select_columns(["id", "text"]),
        "relevant_docs": relevant,
        "top_ranked": None,
    }


# -----------------------------------------------------------------------------
# Subsampling for quick checks


def subsample_split(data: dict, max_queries: int | None, max_pages: int | None, seed: int) -> dict:
    """Keep at most `max_queries` queries (those with a relevant page) and at most `max_pages` pages: every relevant
    page of a kept query, then random other pages. Seeded, so every run of a checkpoint sees the same subset."""
    rng = random.Random(seed)
    queries, qrels, corpus = data["queries"], data["relevant_docs"], data["corpus"]
    query_ids = list(queries["id"])
    answered = [q for q in query_ids if any(s > 0 for s in qrels.get(q, {}).values())]
    if max_queries is not None and len(answered) > max_queries:
        answered = rng.sample(answered, max_queries)
    keep = set(answered)
    queries = queries.select([i for i, q in enumerate(query_ids) if q in keep])
    qrels = {q: qrels[q] for q in query_ids if q in keep}
    if max_pages is not None:
        page_ids = list(corpus["id"])
        needed = {d for q in keep for d in qrels[q]}
        others = [i for i, d in enumerate(page_ids) if d not in needed]
        fill = set(rng.sample(others, min(len(others), max(0, max_pages - len(needed)))))
        corpus = corpus.select([i for i, d in enumerate(page_ids) if d in needed or i in fill])
    top_ranked = data.get("top_ranked")
    if top_ranked is not None:
        in_corpus = set(corpus["id"])
        top_ranked = {q: [d for d in top_ranked[q] if d in in_corpus] for q in keep if q in top_ranked}
    return dict(data, corpus=corpus, queries=queries, relevant_docs=qrels, top_ranked=top_ranked)


def subsample_task_data(task, max_queries: int | None, max_pages: int | None, seed: int) -> None:
    """subsample_split on every subset and split of a task's loaded data (`task.dataset`), saying what is left."""
    for subset, splits in task.dataset.items():
        for split in list(splits):
            before = (len(splits[split]["queries"]), len(splits[split]["corpus"]))
            splits[split] = subsample_split(splits[split], max_queries, max_pages, seed)
            print(
                f"{task.metadata.name} {subset}/{split}: {len(splits[split]['queries'])} of {before[0]} "
                f"queries, {len(splits[split]['corpus'])} of {before[1]} pages"
            )


# -----------------------------------------------------------------------------
# mteb adapter: the only code here that relies on mteb's internals rather than its public API (get_benchmarks,
# TaskMetadata, custom AbsTaskRetrieval subclasses, evaluate, ResultCache). It is pinned, with messages that name
# what changed, by tests/test_eval.py::test_mteb_internals_eval_relies_on: run it after upgrading mteb.


def uses_generic_retrieval_loader(task) -> bool:
    """Whether `task` loads through mteb's generic retrieval loader (AbsTaskRetrieval.load_data, as ViDoRe v3 does:
    configs corpus/queries/qrels, or <subset>-corpus/-queries/-qrels), rather than a loader of its class's own
    (ViDoRe v1/v2: configs corpus, queries, qrels, split by split). mteb says which only by whether the task's class
    overrides load_data; check_hub_layout needs it to name a local copy's missing configs before anything loads."""
    from mteb.abstasks import AbsTaskRetrieval

    return type(task).load_data is AbsTaskRetrieval.load_data


def read_dataset_from(task, folder: str) -> None:
    """Make `task`'s own loader read `folder` instead of its hub dataset. Relies on every ViDoRe loader passing the
    instance's `metadata.dataset["path"]` to datasets.load_dataset. The metadata changed is a copy on the instance
    (the class keeps the hub id, as mteb registered it); mteb's unload_data drops it once the task is evaluated,
    which is harmless: eval.py evaluates each task once, and mteb records the result before unloading."""
    task.metadata = task.metadata.model_copy(deep=True)
    task.metadata.dataset["path"] = folder
    # datasets ignores the revision of a local folder; results record where the data came from
    task.metadata.dataset["revision"] = f"local-copy-of-{task.metadata.dataset.get('revision')}"


def subsample_on_load(task, max_queries: int | None, max_pages: int | None, seed: int) -> None:
    """Subsample right after the task loads its data, by wrapping the instance's load_data. mteb has no hook that
    runs after every task's loading (dataset_transform is not called by the ViDoRe v1/v2 loaders), so this relies on:
    mteb.evaluate calling `task.load_data(...)` only when the task's results are missing from its cache (so resuming
    a run does not reload finished tasks) and `task.data_loaded` is false; and AbsTaskRetrieval's
    convert_v1_dataset_format_to_v2 turning what the ViDoRe v1/v2 loaders leave (task.queries/corpus/relevant_docs)
    into `task.dataset[subset][split]` (mteb calls it again before evaluating, a no-op by then)."""
    load = task.load_data

    def load_data(*args, **kwargs):
        if task.data_loaded:
            return
        load(*args, **kwargs)
        task.convert_v1_dataset_format_to_v2(num_proc=kwargs.get("num_proc"))
        subsample_task_data(task, max_queries, max_pages, seed)

    task.load_data = load_data


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


def main(args):
    if args.list:
        print(list_benchmarks())
        return None
    check_output(args.out or os.path.join("outputs", "eval", "summary.json"), "--out")
    check_output(args.results_dir, "--results_dir", "folder")
    if args.predictions_dir:
        check_output(args.predictions_dir, "--predictions_dir", "folder")
    with distributed_run(args.device) as run:
        args.device = run.device  # every rank runs the same mteb steps; only rank 0 prints and writes
        return evaluate(args, run.rank, run.world)


def evaluate(args, rank: int, world: int):

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

    encoder = load_encoder(
        ckpt=args.ckpt,
        model_id=args.model_id,
        device=args.device,
        dtype=args.dtype,
        max_tiles=args.max_tiles,
        seed=args.seed,
        proj_dim=args.proj_dim or 128,
        experiment_kwargs=subsample,
        score_dtype=args.score_dtype,
        quantize=args.quantize,
        pool_factor=args.pool_factor,
        rerank=args.rerank,
        attn_implementation=args.attn_implementation,
        dim=args.dim,
    )
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
