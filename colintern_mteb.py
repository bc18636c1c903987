"""ColIntern inside mteb: the encoder mteb evaluates (ColInternEncoder, scored with exact MaxSim), its ModelMeta
and result key, ViDoRe tasks pointed at local copies, and subsampling. eval.py runs the evaluation (of a checkpoint
or an exported folder); export.py builds an exported folder's ModelMeta here (the registration it writes loads the
folder through mteb's MultiVectorWrapper)."""

import dataclasses
import datetime
import os
import random
import time

import mteb
import torch
import torch.nn as nn
from mteb.models.abs_encoder import AbsEncoder

import colintern_scoring
from colintern_cli import UserFileNotFoundError, UserValueError, progress_bar
from colintern_data import (
    COLPALI_TRAIN_SET,
    HUB_CONFIGS,
    check_hub_layout,
    datasets_cache_for,
    folder_sha256,
    image_hash,
    json_digest,
    safe_name,
)
from colintern_launch import gather_to_all, rank_share, ranks_agree
from colintern_model import ColIntern
from colintern_scoring import dtype_name, index_bytes, matmul_dtype, maxsim_scores, pool_pages, score_identity

# The metrics reported, as mteb names them (the table and the plots head them with colintern_cli.metric_label)
METRICS = ["ndcg_at_5", "ndcg_at_10", "recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10"]


# -----------------------------------------------------------------------------
# Identity: what the mteb revision (the result key) is made of, and the lineage declared to mteb


def model_label(ckpt: str | None, seed: int) -> str:
    """How the mteb revision names the model evaluated, for people (the key after it is what identifies it)."""
    return safe_name(os.path.splitext(os.path.basename(os.path.normpath(ckpt)))[0]) if ckpt else f"untrained-seed{seed}"


def result_key(scores: dict, data_fingerprint: str | None) -> str:
    """The one key cached results are filed under (mteb's model revision): what the scores depend on
    (colintern_scoring.score_identity: the embeddings' identity, the score dtype, scoring, rerank, dimension) and the
    data (`files_fingerprint` of a local copy; None for hub data, pinned by mteb's task metadata). mteb serves a
    cached result whenever the key matches, so everything that changes scores must be in it."""
    return json_digest({"scores": scores, "data": data_fingerprint}, 12)


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


# -----------------------------------------------------------------------------
# The MTEB model: ColIntern behind mteb's encoder protocol, scored with exact MaxSim


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
    dtype: see colintern_scoring.score_dtype)."""
    return maxsim_scores(as_multivectors(queries), as_multivectors(pages), device=device, dtype=dtype)


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
        self.page_cache = {}  # image_hash -> (Lp, D) float32 CPU tensor (pooled with pool_factor > 1)
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
                missing = list(dict.fromkeys(k for k in map(image_hash, batch["image"]) if k not in known))
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
                        by_key = {k: im for k, im in zip(map(image_hash, batch["image"]), batch["image"])}
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
            keys = [image_hash(im) for im in batch["image"]]
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
        loader=mteb_loader,
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


@dataclasses.dataclass(frozen=True)
class EncoderSettings:
    """What load_encoder builds, from eval.py's model flags (built once: `from_args`). As resolved by load_encoder
    (the checkpoint's tiles, projection size, quantisation, ...) they are also the ModelMeta's loader_kwargs."""

    ckpt: str | None = None  # heads + LoRA; None: the untrained baseline (seeded random heads) on model_id
    model_id: str | None = None  # the backbone; default the checkpoint's
    device: str = "cpu"
    dtype: str = "auto"
    max_tiles: int | None = None  # default the checkpoint's (4 for the baseline)
    seed: int = 0  # the baseline's heads
    proj_dim: int = 128  # the baseline's heads
    score_dtype: str = "fp32"  # fp32, bf16, auto: the dtype MaxSim scores in
    quantize: str | None = None  # None: the checkpoint's, or none without one
    pool_factor: int = 1
    rerank: int = 0
    attn_implementation: str = "sdpa"
    dim: int | None = None  # a Matryoshka prefix the checkpoint trained; default the full size

    @classmethod
    def from_args(cls, args, device: str) -> "EncoderSettings":
        return cls(
            ckpt=args.ckpt,
            model_id=args.model_id,
            device=device,
            dtype=args.dtype,
            max_tiles=args.max_tiles,
            seed=args.seed,
            proj_dim=args.proj_dim or 128,
            score_dtype=args.score_dtype,
            quantize=args.quantize,
            pool_factor=args.pool_factor,
            rerank=args.rerank,
            attn_implementation=args.attn_implementation,
            dim=args.dim,
        )


def mteb_loader(model_name: str | None = None, revision: str | None = None, **loader_kwargs) -> "ColInternEncoder":
    """The ModelMeta's loader, as mteb calls it: the loader_kwargs are EncoderSettings' fields."""
    return load_encoder(EncoderSettings(**loader_kwargs))


def load_encoder(settings: EncoderSettings, experiment_kwargs: dict | None = None) -> "ColInternEncoder":
    """A checkpoint (heads + LoRA on its backbone, or on `model_id`), or with no checkpoint the untrained baseline
    (seeded random heads, no LoRA) on `model_id`, as mteb's encoder. The score dtype is resolved here and kept
    resolved in the loader keywords; the result key (colintern_scoring.score_identity of what was loaded) holds the
    quantisation used, so either spelling of it shares results. `pool_factor` and `rerank`: see
    ColInternEncoder.similarity."""
    s = settings
    scoring = colintern_scoring.score_dtype(s.score_dtype, s.device)  # the flag's value -> a dtype
    print(
        f"score dtype {dtype_name(scoring)} (--score_dtype {s.score_dtype}; multiplied in "
        f"{dtype_name(matmul_dtype(scoring, s.device))} on {s.device})"
    )
    backbone = dict(
        dtype=s.dtype,
        device_map=None if s.device == "cpu" else s.device,
        attn_implementation=s.attn_implementation,
        dim=s.dim,
    )
    if s.ckpt is not None:
        model, processor, ckpt_dict = ColIntern.from_checkpoint(
            s.ckpt, model_id=s.model_id, max_tiles=s.max_tiles, quantize=s.quantize, **backbone
        )
    else:
        ckpt_dict = None
        if s.model_id is None:
            raise UserValueError("pass --ckpt CKPT, or --model_id MODEL alone for the untrained baseline")
        model, processor = ColIntern.from_pretrained(
            s.model_id,
            proj_dim=s.proj_dim,
            lora=None,
            max_tiles=s.max_tiles or 4,
            quantize=s.quantize or "none",
            **backbone,
        )
        baseline_heads(model, s.seed)
    resolved = dataclasses.replace(
        s,
        model_id=model.model_id,
        max_tiles=model.max_tiles,
        proj_dim=model.proj_dim,
        score_dtype=dtype_name(scoring),
        quantize=model.quantize,
        dim=model.dim,
    )
    scores = score_identity(model.embedding_identity(s.pool_factor), scoring, s.device, s.rerank)
    training_data, lineage_from = checkpoint_training_data(s.ckpt, ckpt_dict)
    encoder = ColInternEncoder(
        model.eval(),
        processor,
        None,
        device=s.device,
        result_identity=(model_label(s.ckpt, s.seed), scores),
        training_data=(training_data, lineage_from),
        score_dtype=scoring,
        pool_factor=s.pool_factor,
        rerank=s.rerank,
    )
    encoder.mteb_model_meta = build_model_meta(
        model,
        model.model_id,
        encoder.revision_for(None),
        s.ckpt,
        dataclasses.asdict(resolved),
        experiment_kwargs,
        training_data,
        name=ckpt_dict and ckpt_dict["meta"].get("name"),
    )  # export.py's
    return encoder


# -----------------------------------------------------------------------------
# Tasks on local data: hub copies (--data_dir) and custom folders (--local_task)


def dataset_folder_name(task) -> str:
    return task.metadata.dataset["path"].rstrip("/").split("/")[-1]


def required_configs(task) -> list:
    """The dataset configs a task's loader reads, as alternatives: [("corpus",), ("queries", "query"), ...]."""
    if not uses_generic_retrieval_loader(task):
        return [(c,) for c in HUB_CONFIGS]  # the ViDoRe v1/v2 loaders read these three configs, split by split
    if not task.metadata.is_multilingual:  # mteb's generic loader (ViDoRe v3)
        return [("corpus",), ("queries", "query"), ("qrels", "default")]
    return [c for s in task.hf_subsets for c in ((f"{s}-corpus",), (f"{s}-queries", "query"), (f"{s}-qrels",))]


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
# Subsampling for quick checks (--max_queries, --max_pages)


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
# mteb internals: the only code here that relies on mteb's internals rather than its public API (get_benchmarks,
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
