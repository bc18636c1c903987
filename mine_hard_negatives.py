r"""Mine hard negatives for training queries with a trained ColIntern checkpoint (the step between epoch 1 and 2).

    # every row of a hub dataset (or a local copy in the hub layout) is a query + its positive page
    python mine_hard_negatives.py --ckpt outputs/colintern-1b-e1/colintern_heads_epoch1.pt \
        --train_hub vidore/colpali_train_set --split train --out outputs/hardnegs_e1.jsonl \
        --k 8 --doc_batch 32 --query_batch 256
    # the queries of an existing {"query","pos","negs"} JSONL, over the pages it names; FAISS candidates
    python mine_hard_negatives.py --ckpt CKPT --train_jsonl data/train.jsonl --root data \
        --out outputs/mined.jsonl --search faiss --candidates 100

Writes OUT.jsonl, one `{"query", "pos", "negs"}` line per query in input order, pages named as in the input
(HF pseudo-paths DATASET/SPLIT/doc_N.png for hub data), ready for `train.py --train_jsonl OUT.jsonl`; and
OUT.stats.json: the positive's rank under the model (recall@1/5/10, MRR), what the filter dropped, pages
deduplicated, timings per phase.

How:
1. Pages are deduplicated by a hash of their stored image bytes (colpali_train_set repeats pages): each distinct
   page is encoded once, and a query's positive and every page with the same content are one page, never a negative.
2. Distinct pages are encoded in shards of --shard_pages pages, each saved (fp16, atomically) in --cache_dir, in a
   folder keyed by the checkpoint's content, model id, tiles, dtype, score dtype and data source. A re-run reuses
   every shard that holds exactly the pages it needs; a kill loses at most the shard being encoded. With
   --pool_factor F each page is pooled (colintern_scoring.pool_page) before its shard is saved: the cache (keyed by F)
   and every search then hold max(1, L // F) vectors a page; queries are never pooled.
3. Each query's positive is scored first. The positive (and so every copy of it) is never a candidate, a page
   scoring above --margin x the positive's score is dropped as a likely false negative (NV-Retriever's
   TopK-PercPos), and the k best of the rest are written.
   Exact search streams the shards past all queries (held on --device), filters inside the stream and keeps a
   running top-k per query: memory follows the shard size, not the corpus, and the k written are exactly the k
   best valid pages however many the filter drops. FAISS search retrieves each query token's nearest page tokens
   (IndexFlatIP up to FLAT_MAX_TOKENS tokens, IVF-PQ above; GPU when FAISS sees one), votes them into
   --candidates pages per query, and re-ranks those with exact MaxSim before the same filter.
"""

import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from colintern_checkpoint import atomic_torch_save
from colintern_cli import ArgumentParser, UserRuntimeError, looks_like_hub_id, progress_bar, run_cli
from colintern_data import (
    PageResolver,
    check_output,
    file_sha1,
    hashes_digest,
    json_digest,
    pseudo_path,
    raw_images,
    read_queries,
    read_triples,
    stored_page_hash,
    write_json,
    write_jsonl,
)
from colintern_launch import add_model_flags, distributed_run, gather_to_all, rank_share, ranks_agree
from colintern_model import ColIntern, resolve_dtype, unpad
from colintern_scoring import (
    QUERY_BLOCK_TOKENS,
    dtype_name,
    matmul_dtype,
    maxsim_tokens,
    maxsim_topk,
    merge_topk,
    pack_queries,
    pool_pages,
    query_blocks,
    score_dtype,
    scoring_threads,
    sum_by_query,
    sync,
    top_k_by_index,
)

FLAT_MAX_TOKENS = 1 << 22  # exact token index up to 4M page tokens (2 GB fp32); IVF-PQ above
CACHE_VERSION = 2  # bump when the shard layout or the key changes (2: keyed by ColIntern.embedding_identity)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    add_model_flags(p.add_argument_group("model"), ckpt_required=True)
    g = p.add_argument_group("data (one of --train_hub or --train_jsonl)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--train_hub",
        "--hub_name",
        dest="train_hub",
        default=None,
        help="hub dataset (vidore/colpali_train_set) or a local copy with its columns (query, image): "
        "each row is a query and its positive page",
    )
    src.add_argument(
        "--train_jsonl",
        default=None,
        help='JSONL of {"query","pos","negs"}: mine for its queries over every page it names',
    )
    g.add_argument("--split", default="train", help="split of --train_hub")
    g.add_argument("--root", default=".", help="folder that page paths in --train_jsonl are relative to")
    g.add_argument(
        "--out",
        "--out_jsonl",
        dest="out",
        required=True,
        help="output JSONL; the stats go to the same name + .stats.json",
    )
    g = p.add_argument_group("mining")
    g.add_argument("--k", type=int, default=8, help="hard negatives written per query")
    g.add_argument(
        "--margin",
        type=float,
        default=0.95,
        help="drop a candidate scoring above MARGIN x the positive's score as a likely false negative "
        "(TopK-PercPos); --margin inf turns the filter off",
    )
    g.add_argument(
        "--search",
        default="exact",
        choices=("exact", "faiss"),
        help="exact: MaxSim of every query with every page, streamed shard by shard; faiss: token-level "
        "FAISS candidates re-ranked with exact MaxSim",
    )
    g.add_argument(
        "--candidates", type=int, default=100, help="--search faiss: pages per query re-ranked with exact MaxSim"
    )
    g.add_argument(
        "--token_hits", type=int, default=64, help="--search faiss: nearest page tokens retrieved per query token"
    )
    g.add_argument(
        "--faiss_index",
        default="auto",
        help="--search faiss: a faiss.index_factory string over page tokens, or auto (Flat up to "
        f"{FLAT_MAX_TOKENS} tokens, else IVF<4 sqrt(N)>,PQ<D/4>)",
    )
    g.add_argument("--nprobe", type=int, default=32, help="--search faiss with IVF: inverted lists visited per token")
    g = p.add_argument_group("throughput and cache")
    g.add_argument("--doc_batch", type=int, default=8, help="pages per forward pass when encoding")
    g.add_argument("--query_batch", type=int, default=64, help="queries per forward pass when encoding")
    g.add_argument("--num_workers", type=int, default=2, help="processes that decode and tile pages (0: in-process)")
    g.add_argument(
        "--shard_pages",
        type=int,
        default=1024,
        help="distinct pages per cached shard: the unit of resume and of search memory",
    )
    g.add_argument(
        "--cache_dir",
        default=None,
        help="folder for page-embedding shards (default: page_cache/ beside --out); one subfolder "
        "per checkpoint + pages, reused by later runs",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for the FAISS IVF training sample")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for flag in (
        "k",
        "candidates",
        "token_hits",
        "nprobe",
        "doc_batch",
        "query_batch",
        "shard_pages",
        "pool_factor",
        "dim",
    ):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        p.error(f"--num_workers must be >= 0, got {args.num_workers}")
    if not args.margin > 0:
        p.error(f"--margin must be > 0 (inf turns the filter off), got {args.margin}")
    if args.search == "faiss" and args.candidates < args.k:
        p.error(f"--candidates ({args.candidates}) must be >= --k ({args.k}): negatives come from the candidates")
    return args


# -----------------------------------------------------------------------------
# Input: queries, their positives, and the distinct pages (by content)


@dataclasses.dataclass
class MiningInput:
    source: dict  # what was mined, for the cache manifest and the stats
    queries: list  # query texts, in input order
    pos_refs: list  # each query's positive, named as in the input
    positives: list  # each query's positive as a distinct-page index
    page_refs: list  # each distinct page's reference (its first occurrence in the input)
    page_wheres: list  # where that occurrence is, for errors: "FILE line N" or "--train_hub NAME split S row N"
    page_hashes: list  # each distinct page's content hash
    page_mentions: int  # page references before deduplication
    resolver: PageResolver  # opens page_refs (picklable, for DataLoader workers)
    # per query, what its output row carries besides query/pos/negs: a hub row's `source`, a JSONL row's other fields
    # (so that training on the mined JSONL can --batch_by them)
    fields: list = dataclasses.field(default_factory=list)


class Deduper:
    """Assigns distinct-page indices by content hash, first occurrence first."""

    def __init__(self):
        self.index, self.hashes, self.firsts, self.mentions = {}, [], [], 0

    def add(self, content_hash: str, first) -> int:
        self.mentions += 1
        if content_hash not in self.index:
            self.index[content_hash] = len(self.hashes)
            self.hashes.append(content_hash)
            self.firsts.append(first)
        return self.index[content_hash]


def hub_input(name: str, split: str) -> MiningInput:
    """Each row of a hub dataset is a query and its positive page, named by its pseudo-path."""
    what = f"--train_hub {name} split {split!r}"
    resolver = PageResolver(root=None)  # the rows' pseudo-paths only, never a file
    ds = resolver.dataset(name, split, columns=("query", "image"))
    queries = read_queries(ds, what)
    fields = [{"source": v} for v in ds["source"]] if "source" in ds.column_names else []
    dedup, positives = Deduper(), []
    raw = raw_images(ds).select_columns(["image"])
    batch = 512
    with progress_bar(total=len(ds), desc="hash pages", unit="page") as bar:
        for start, values in zip(range(0, len(ds), batch), raw.iter(batch_size=batch)):
            for offset, value in enumerate(values["image"]):
                row = start + offset
                positives.append(dedup.add(stored_page_hash(value, f"{what} row {row}"), row))
            bar.update(len(values["image"]))
    return MiningInput(
        source={"hub_name": name, "split": split, "rows": len(ds)},
        queries=queries,
        pos_refs=[pseudo_path(name, split, row) for row in range(len(ds))],
        positives=positives,
        page_refs=[pseudo_path(name, split, row) for row in dedup.firsts],
        page_wheres=[f"{what} row {row}" for row in dedup.firsts],
        page_hashes=dedup.hashes,
        page_mentions=dedup.mentions,
        resolver=resolver,
        fields=fields,
    )


def jsonl_input(path: str, root: str) -> MiningInput:
    """The queries of a {"query","pos","negs"} JSONL, over every page it names."""
    rows = read_triples(path)  # names file and line of a row without 'query' or 'pos'
    resolver = PageResolver(root)
    dedup, by_ref, positives = Deduper(), {}, []
    for row in progress_bar(rows, desc="hash pages", unit="row"):
        where = f"{path} line {row['line']}"
        for j, ref in enumerate([row["pos"], *row["negs"]]):
            if ref not in by_ref:
                by_ref[ref] = dedup.add(resolver.content_hash(ref, where), (ref, where))
            else:
                dedup.mentions += 1
            if j == 0:
                positives.append(by_ref[ref])
    return MiningInput(
        source={
            "train_jsonl": os.path.abspath(path),
            "root": os.path.abspath(root),
            "rows": len(rows),
            "sha1": file_sha1(path),
        },
        queries=[row["query"] for row in rows],
        pos_refs=[row["pos"] for row in rows],
        positives=positives,
        page_refs=[ref for ref, _ in dedup.firsts],
        page_wheres=[where for _, where in dedup.firsts],
        page_hashes=dedup.hashes,
        page_mentions=dedup.mentions,
        resolver=resolver,
        fields=[row["fields"] for row in rows],
    )


# -----------------------------------------------------------------------------
# Page embeddings: fp16 shards on disk, reused across runs


def cache_folder(args, model: ColIntern, data: MiningInput) -> tuple:
    """-> (folder, manifest). The folder is named by a hash of what the embeddings depend on
    (ColIntern.embedding_identity: backbone content, heads and LoRA, format, tiles, dtypes, quantisation, attention,
    pooling) and of where the pages come from; within it, a shard is reused only if it holds exactly the pages this
    run puts there, so a changed page re-encodes its shard, not the corpus."""
    source = {k: v for k, v in data.source.items() if k in ("hub_name", "split", "train_jsonl", "root")}
    identity = {
        "cache_version": CACHE_VERSION,
        "embedding": model.embedding_identity(args.pool_factor),
        "source": source,
        "shard_pages": args.shard_pages,
    }
    key = json_digest(identity, 20)
    base = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "page_cache")
    folder = os.path.join(base, key)
    manifest = dict(
        identity,
        ckpt=ckpt_name(args.ckpt),
        pages=len(data.page_hashes),
        n_shards=math.ceil(len(data.page_hashes) / args.shard_pages),
        shards={},
    )
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest["shards"] = json.load(f).get("shards", {})
    except FileNotFoundError:
        pass
    return folder, manifest


def shard_path(folder: str, s: int) -> str:
    return os.path.join(folder, f"shard_{s:05d}.pt")


def shard_range(s: int, n_pages: int, shard_pages: int) -> range:
    return range(s * shard_pages, min(n_pages, (s + 1) * shard_pages))


def load_shard(folder: str, s: int, expected_hashes: list) -> list | None:
    """A finished shard as a list of (L_i, D) fp16 tensors, or None if it is absent, unreadable or stale."""
    path = shard_path(folder, s)
    if not os.path.isfile(path):
        return None
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        print(f"page-embedding shard {path} cannot be read: {type(e).__name__}: {e}")
        return None
    if shard.get("hashes") != expected_hashes:
        print(f"page-embedding shard {path} holds other pages than this run expects")
        return None
    return list(torch.split(shard["embeddings"], shard["lengths"].tolist()))


class PageImages(torch.utils.data.Dataset):
    """Distinct pages of one shard, opened in DataLoader workers by the resolver (its errors name the page and
    where it was referenced); the processor tiles them."""

    def __init__(self, data: MiningInput, indices: list):
        self.resolver = data.resolver
        self.pages = [(data.page_refs[i], data.page_wheres[i]) for i in indices]  # only this shard's go to workers

    def __len__(self):
        return len(self.pages)

    def __getitem__(self, i):
        return self.resolver(*self.pages[i])


def encode_shard(model, processor, data: MiningInput, indices: list, args, bar) -> list:
    loader = torch.utils.data.DataLoader(
        PageImages(data, indices),
        batch_size=args.doc_batch,
        num_workers=args.num_workers,
        collate_fn=processor.process_pages,
        pin_memory=model.device.type == "cuda",
    )  # copied on non_blocking
    out = []
    with torch.inference_mode():
        for batch in loader:
            emb, mask = model.forward_pages(batch)
            out.extend(unpad(emb.to(torch.float16), mask))
            bar.update(len(emb))
    return out


def ckpt_name(ckpt: str) -> str:
    """How the stats and the cache manifest name --ckpt: a local checkpoint by its absolute path, a hub id as it is."""
    return ckpt if looks_like_hub_id(ckpt) else os.path.abspath(ckpt)


def pages_note_path(folder: str, s: int) -> str:
    """Beside each shard, written by the process that encoded it: the digest of the pages it holds."""
    return os.path.join(folder, f"pages_{s:05d}.json")


def finished_digest(folder: str, s: int) -> str | None:
    """The pages digest a finished shard was recorded with (its note), or None if the shard or its note is absent."""
    if not os.path.isfile(shard_path(folder, s)):
        return None
    try:
        with open(pages_note_path(folder, s)) as f:
            return json.load(f).get("pages_sha256")
    except FileNotFoundError:
        return None


def shards_to_encode(data: MiningInput, folder: str, manifest: dict, args) -> list:
    """The shards not in `folder` with exactly the pages this run puts there."""
    n_pages, todo = len(data.page_hashes), []
    for s in range(manifest["n_shards"]):
        pages = shard_range(s, n_pages, args.shard_pages)
        if finished_digest(folder, s) != hashes_digest(data.page_hashes[pages.start : pages.stop]):
            todo.append(s)
    return todo


def ensure_shards(model, processor, data: MiningInput, folder: str, todo: list, args, run: "MiningRun") -> float:
    """Encode this rank's share of the shards in `todo` (every world-th, from the rank-th), pooled with
    --pool_factor > 1; -> the seconds this process spent pooling. Each shard is written atomically, then its pages
    note, so a kill loses at most the shard each process is encoding and a later run, with any number of processes,
    reuses the rest. No two processes write the same file."""
    os.makedirs(folder, exist_ok=True)
    rank, world = run.rank, run.world
    n_pages, mine, pooling_s = len(data.page_hashes), todo[rank::world], 0.0
    total = sum(len(shard_range(s, n_pages, args.shard_pages)) for s in mine)
    with progress_bar(total=total, desc="encode pages", unit="page", disable=total == 0 or rank != 0) as bar:
        for s in mine:
            pages = shard_range(s, n_pages, args.shard_pages)
            hashes = data.page_hashes[pages.start : pages.stop]
            emb = encode_shard(model, processor, data, list(pages), args, bar)
            if args.pool_factor != 1:  # the shard is cached (and searched) pooled
                start = time.perf_counter()
                emb = [p.to(torch.float16) for p in pool_pages([e.float() for e in emb], args.pool_factor)]
                pooling_s += time.perf_counter() - start
            atomic_torch_save(
                {"embeddings": torch.cat(emb), "lengths": torch.tensor([len(e) for e in emb]), "hashes": hashes},
                shard_path(folder, s),
            )
            write_json(
                pages_note_path(folder, s),
                {"pages_sha256": hashes_digest(hashes), "pages": len(hashes), "tokens": sum(len(e) for e in emb)},
            )
    return pooling_s


def write_manifest(folder: str, manifest: dict) -> None:
    """manifest.json (for people: what the folder holds), from the shards' pages notes; one process writes it."""
    for s in range(manifest["n_shards"]):
        try:
            with open(pages_note_path(folder, s)) as f:
                manifest["shards"][str(s)] = json.load(f)
        except FileNotFoundError:
            pass
    write_json(os.path.join(folder, "manifest.json"), manifest)


def iter_shards(folder: str, data: MiningInput, shard_pages: int):
    """Yield (first page index, list of (L_i, D) fp16 page embeddings) shard by shard."""
    n_pages = len(data.page_hashes)
    for s in range(math.ceil(n_pages / shard_pages)):
        pages = shard_range(s, n_pages, shard_pages)
        shard = load_shard(folder, s, data.page_hashes[pages.start : pages.stop])
        if shard is None:
            raise UserRuntimeError(
                f"page-embedding shard {shard_path(folder, s)} is missing, unreadable or holds other pages: delete "
                "it and run again (only that shard is encoded again)"
            )
        yield pages.start, shard


# -----------------------------------------------------------------------------
# Scoring


def score_pairs(queries: list, pages: list, pairs, device, dtype) -> torch.Tensor:
    """Exact MaxSim of (query i, page j) pairs -> (n_pairs,) float32 on the CPU. Pairs are grouped by page so each
    page meets all its queries in one matmul."""
    q_idx, p_idx = (torch.as_tensor(x, dtype=torch.long) for x in pairs)
    out = torch.empty(len(q_idx))
    if len(q_idx) == 0:
        return out
    compute = matmul_dtype(dtype, device)
    order = torch.argsort(p_idx, stable=True)
    bounds = torch.searchsorted(p_idx[order], torch.unique(p_idx), right=True).tolist()
    start = 0
    with scoring_threads(device) as workers:
        for end in bounds:
            sel = order[start:end]
            # the page's tokens, rounded and converted as a query's are: (1, Lp, D)
            page = pack_queries([pages[int(p_idx[sel[0]])]], dtype, device, compute)[0][None]
            tokens, owner = pack_queries([queries[i] for i in q_idx[sel].tolist()], dtype, device, compute)
            best = maxsim_tokens(tokens, page, workers=workers)  # (T, 1)
            out[sel] = sum_by_query(best, owner, len(sel))[:, 0].cpu()
            start = end
    return out


def positive_scores(queries: list, data: MiningInput, folder: str, args, device, dtype) -> torch.Tensor:
    """Each query's exact MaxSim with its own positive page -> (Nq,) float32."""
    positives = torch.tensor(data.positives)
    scores = torch.empty(len(queries))
    for first, shard in progress_bar(
        iter_shards(folder, data, args.shard_pages),
        desc="score positives",
        unit="shard",
        total=math.ceil(len(data.page_hashes) / args.shard_pages),
    ):
        mine = ((positives >= first) & (positives < first + len(shard))).nonzero()[:, 0]
        scores[mine] = score_pairs(queries, shard, (mine, positives[mine] - first), device, dtype)
    return scores


def margin_ceiling(pos_scores: torch.Tensor, margin: float) -> torch.Tensor:
    """Scores above this are likely false negatives (TopK-PercPos); inf when the filter is off."""
    if math.isinf(margin):
        return torch.full_like(pos_scores, float("inf"))
    return margin * pos_scores


def exact_search(
    queries: list, data: MiningInput, pos_scores: torch.Tensor, folder: str, args, run: "MiningRun", part: range
) -> dict:
    """Every query (of `part`: this rank's) x every page, shard by shard; the filter runs inside the stream, before
    the running top-k. -> results for the queries of `part`, in order."""
    device, dtype = run.device, run.scoring
    queries, pos_scores = queries[part.start : part.stop], pos_scores[part.start : part.stop]
    nq, k = len(queries), args.k
    positives = torch.tensor(data.positives[part.start : part.stop], device=device)
    pos_dev = pos_scores.to(device)
    ceiling = margin_ceiling(pos_scores, args.margin).to(device)
    above = torch.zeros(nq, dtype=torch.long, device=device)  # pages scoring above the positive
    dropped = torch.zeros(nq, dtype=torch.long, device=device)  # pages the margin filter removed
    values = torch.full((nq, k), float("-inf"))
    indices = torch.full((nq, k), -1, dtype=torch.long)
    shards = math.ceil(len(data.page_hashes) / args.shard_pages)
    for first, shard in progress_bar(
        iter_shards(folder, data, args.shard_pages), total=shards, desc="exact search", unit="shard"
    ):

        def on_scores(q0, q1, idx, scores, first=first):
            scores.masked_fill_((first + idx)[None, :] == positives[q0:q1, None], float("-inf"))
            above[q0:q1] += (scores > pos_dev[q0:q1, None]).sum(dim=1)
            drop = scores > ceiling[q0:q1, None]
            dropped[q0:q1] += drop.sum(dim=1)
            scores.masked_fill_(drop, float("-inf"))

        v, i = maxsim_topk(
            queries, shard, k, device=device, dtype=dtype, on_scores=on_scores, query_block_tokens=QUERY_BLOCK_TOKENS
        )
        values, indices = merge_topk(values, indices, v, torch.where(i >= 0, i + first, i), k)
    indices[values == float("-inf")] = -1
    return {"negatives": indices, "neg_scores": values, "rank": 1 + above.cpu(), "dropped": dropped.cpu()}


# -- FAISS ----------------------------------------------------------------------


def index_spec(spec: str, n_tokens: int, dim: int) -> str:
    if spec != "auto":
        return spec
    if n_tokens <= FLAT_MAX_TOKENS:
        return "Flat"
    nlist = 2 ** min(16, max(6, round(math.log2(4 * math.sqrt(n_tokens)))))
    return f"IVF{nlist},PQ{dim // 4}"


def faiss_device(device, say=print) -> int | None:
    """The GPU FAISS builds and searches on: this rank's own (`device` cuda:N -> N, the ordinal torch and FAISS share
    under the same CUDA_VISIBLE_DEVICES), or None for the CPU: --device cpu, or a FAISS without GPU support
    (faiss-cpu), said in one line. Before a GPU index, torch hands its cached blocks back to the driver, for FAISS."""
    import faiss

    device = torch.device(device)
    if device.type != "cuda":
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        say(
            f"FAISS runs on the CPU: this faiss {getattr(faiss, '__version__', '')} has no GPU support (faiss-cpu); "
            f"`make setup` on a machine with an NVIDIA GPU installs a GPU FAISS"
        )
        return None
    torch.cuda.empty_cache()
    return torch.cuda.current_device() if device.index is None else device.index


def build_token_index(shards, spec: str = "auto", nprobe: int = 32, seed: int = 0, gpu: int | None = None) -> tuple:
    """-> (index, token_page (n_tokens,) int64, spec): every page token in a FAISS inner-product index, on GPU
    `gpu` (see faiss_device) or the CPU. `shards()` yields (first page index, list of (L_i, D) page embeddings); it
    is called once per pass."""
    import faiss

    lengths, dim = [], None
    for _, shard in shards():
        lengths.extend(len(p) for p in shard)
        dim = shard[0].shape[1]
    token_page = np.repeat(np.arange(len(lengths)), lengths)
    spec = index_spec(spec, len(token_page), dim)
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index (Flat, HNSW, ...): nothing to train lists for or probe
        nlist = None
    on_gpu = gpu is not None
    if on_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
    if not index.is_trained:
        # a sample spread over all shards; 64 tokens per inverted list (FAISS wants >= 39)
        n_train = min(len(token_page), 64 * (nlist or 1024))
        pick = np.sort(np.random.default_rng(seed).choice(len(token_page), size=n_train, replace=False))
        sample, offset = [], 0
        for _, shard in shards():
            flat = torch.cat(shard).float().numpy()
            sample.append(flat[pick[(pick >= offset) & (pick < offset + len(flat))] - offset])
            offset += len(flat)
        print(f"training FAISS {spec} on {n_train} page tokens")
        index.train(np.ascontiguousarray(np.concatenate(sample)))
    for _, shard in progress_bar(shards(), desc="FAISS index", unit="shard"):
        index.add(np.ascontiguousarray(torch.cat(shard).float().numpy()))
    if nlist is not None:
        (faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()).set_index_parameter(index, "nprobe", nprobe)
    return index, torch.from_numpy(token_page), spec


def token_votes(
    hit_pages: torch.Tensor,
    hit_sims: torch.Tensor,
    owner: torch.Tensor,
    n_queries: int,
    n_pages: int,
    n_candidates: int,
) -> torch.Tensor:
    """Candidate pages per query from each query token's nearest page tokens -> (n_queries, n_candidates), -1 pad.

    A page's vote approximates its MaxSim (XTR-style): per query token, its best hit on that page, or, if the token
    hit none of the page's tokens, the token's weakest hit (an upper bound of what it missed). Ranking only needs
    the difference to that imputed value, summed over the tokens that hit the page."""
    t, kt = hit_pages.shape
    valid = hit_pages >= 0  # FAISS pads with -1 when it finds fewer than asked
    floor = torch.where(valid, hit_sims, float("inf")).amin(dim=1, keepdim=True)  # (T, 1) weakest hit per token
    token = torch.arange(t)[:, None].expand(t, kt)[valid]
    page, gain = hit_pages[valid], (hit_sims - floor)[valid]
    # best hit per (token, page), then summed per (query, page)
    pair_key = token * n_pages + page
    unique_pairs, inverse = torch.unique(pair_key, return_inverse=True)
    best = torch.full((len(unique_pairs),), float("-inf")).scatter_reduce(0, inverse, gain, "amax")
    tok, pg = unique_pairs // n_pages, unique_pairs % n_pages
    query_key = owner[tok] * n_pages + pg
    unique_q, inverse_q = torch.unique(query_key, return_inverse=True)
    votes = torch.zeros(len(unique_q)).index_add_(0, inverse_q, best)
    q, p = unique_q // n_pages, unique_q % n_pages
    # best votes first within each query: sort by vote, then stably by query
    order = torch.argsort(votes, descending=True, stable=True)
    order = order[torch.argsort(q[order], stable=True)]
    q, p = q[order], p[order]
    starts = torch.searchsorted(q, torch.arange(n_queries))
    rank = torch.arange(len(q)) - starts[q]
    keep = rank < n_candidates
    out = torch.full((n_queries, n_candidates), -1, dtype=torch.long)
    out[q[keep], rank[keep]] = p[keep]
    return out


def faiss_candidates(
    queries: list, index, token_page: torch.Tensor, n_pages: int, n_candidates: int, token_hits: int
) -> torch.Tensor:
    """-> (Nq, candidates) page indices (-1 pad) from token-level FAISS search, queries in blocks."""
    block = max(1, 65536 // max(1, max(len(q) for q in queries)))
    out = []
    for q0 in progress_bar(range(0, len(queries), block), desc="FAISS search", unit="block"):
        part = queries[q0 : q0 + block]
        tokens, owner = pack_queries(part, torch.float32, "cpu")
        sims, hits = index.search(np.ascontiguousarray(tokens.numpy()), token_hits)
        hits = torch.from_numpy(hits)
        hit_pages = torch.where(hits >= 0, token_page[hits.clamp(min=0)], torch.full_like(hits, -1))
        out.append(token_votes(hit_pages, torch.from_numpy(sims), owner, len(part), n_pages, n_candidates))
    return torch.cat(out)


def faiss_search(
    queries: list, data: MiningInput, pos_scores: torch.Tensor, folder: str, args, run: "MiningRun", timings: dict
) -> dict:
    device, dtype = run.device, run.scoring
    gpu = faiss_device(device)
    where = "cpu" if gpu is None else f"cuda:{gpu}"
    print(f"FAISS index and search on {where}")
    start = time.perf_counter()
    index, token_page, spec = build_token_index(
        lambda: iter_shards(folder, data, args.shard_pages), args.faiss_index, args.nprobe, args.seed, gpu
    )
    timings["build_index"] = time.perf_counter() - start
    start = time.perf_counter()
    candidates = faiss_candidates(
        [q.float().cpu() for q in queries], index, token_page, len(data.page_hashes), args.candidates, args.token_hits
    )
    timings["faiss_search"] = time.perf_counter() - start
    start = time.perf_counter()
    nq, c = candidates.shape
    q_all = torch.arange(nq)[:, None].expand(nq, c)
    valid = candidates >= 0
    pair_q, pair_p = q_all[valid], candidates[valid]
    pair_scores = torch.full((len(pair_q),), float("nan"))
    for first, shard in progress_bar(
        iter_shards(folder, data, args.shard_pages),
        total=math.ceil(len(data.page_hashes) / args.shard_pages),
        desc="re-rank",
        unit="shard",
    ):
        mine = ((pair_p >= first) & (pair_p < first + len(shard))).nonzero()[:, 0]
        pair_scores[mine] = score_pairs(queries, shard, (pair_q[mine], pair_p[mine] - first), device, dtype)
    scores = torch.full((nq, c), float("-inf"))
    scores[valid] = pair_scores
    positives = torch.tensor(data.positives)
    scores[candidates == positives[:, None]] = float("-inf")
    above = (scores > pos_scores[:, None]).sum(dim=1)
    drop = scores > margin_ceiling(pos_scores, args.margin)[:, None]
    scores[drop] = float("-inf")
    values, negatives = top_k_by_index(scores, candidates, args.k)
    negatives[values == float("-inf")] = -1
    timings["rerank"] = time.perf_counter() - start
    return {
        "negatives": negatives,
        "neg_scores": values,
        "rank": 1 + above,
        "dropped": drop.sum(dim=1),
        "index": spec,
        "faiss_device": where,
    }


# -----------------------------------------------------------------------------
# The run: the search split over ranks, main, and the output and stats it writes


def rank_metrics(rank: torch.Tensor) -> dict:
    r = rank.double()
    return {**{f"recall@{n}": float((r <= n).double().mean()) for n in (1, 5, 10)}, "mrr": float((1 / r).mean())}


def page_index_stats(manifest: dict, pool_factor: int, n_pages: int, dim: int, pooling_s: float) -> dict:
    """The searched page index: pool factor, mean vectors per page and fp16 bytes (from the cache manifest, so
    reused shards count too), and the seconds this process (rank 0 under torchrun) spent pooling (inside
    encode_pages)."""
    vectors = sum(shard["tokens"] for shard in manifest["shards"].values())
    return {
        "pool_factor": pool_factor,
        "vectors_per_page": vectors / max(1, n_pages),
        "page_index_bytes": vectors * dim * 2,
        "pooling_s": round(pooling_s, 3),
    }


def stats_path(out_jsonl: str) -> str:
    return os.path.splitext(out_jsonl)[0] + ".stats.json"


def split_search(
    queries: list, data: MiningInput, pos_scores: torch.Tensor, folder: str, args, run: "MiningRun"
) -> dict:
    """This rank's share of the exact search: a contiguous run of maxsim_topk's query blocks (query_blocks over all
    queries), so each block holds the same queries, and so multiplies the same matrices, as in one process."""
    blocks = query_blocks([q.shape[0] for q in queries], QUERY_BLOCK_TOKENS)
    share = rank_share(len(blocks), run.rank, run.world)
    part = range(blocks[share.start][0], blocks[share.stop - 1][1]) if len(share) else range(0)
    return exact_search(queries, data, pos_scores, folder, args, run, part)


def gather_results(result: dict, world: int) -> dict:
    """Per-query search results of every rank's slice -> one dict over all queries, in query order."""
    if world == 1:
        return result
    rows = gather_to_all(list(zip(result["negatives"], result["neg_scores"], result["rank"], result["dropped"])), world)
    negatives, neg_scores, rank, dropped = zip(*rows)
    return {
        "negatives": torch.stack(negatives),
        "neg_scores": torch.stack(neg_scores),
        "rank": torch.stack(rank),
        "dropped": torch.stack(dropped),
    }


def main(args):
    with distributed_run(args.device) as run:
        return mine(args, run.rank, run.world, run.device)


@dataclasses.dataclass(frozen=True)
class MiningRun:
    """How this process mines, fixed once the model is loaded: its rank of world, its device, the model's dtype and
    quantisation (encoding), the dtype MaxSim scores in, and when it started (the stats' total time counts from
    it)."""

    rank: int
    world: int
    device: str
    dtype: torch.dtype
    quantize: str
    scoring: torch.dtype
    started: float


@dataclasses.dataclass(frozen=True)
class PageCache:
    """The page-embedding cache this run reads and fills: its folder, its manifest, how many shards were reused and
    encoded, and the page index's size (page_index_stats)."""

    folder: str
    manifest: dict
    counts: dict
    page_index: dict


def mine(args, rank: int, world: int, device: str):
    """Every rank: load, hash, encode its shards and query batches, search its query blocks; rank 0 writes."""
    say = print if rank == 0 else (lambda *a, **k: None)
    t_start = time.perf_counter()
    timings = {}
    check_output(args.out, "--out")
    if args.cache_dir:
        check_output(args.cache_dir, "--cache_dir", "folder")

    start = time.perf_counter()  # the model first: a wrong --ckpt fails now, not after hashing every page
    with ranks_agree("loading the model and hashing pages", world):
        model, processor, ckpt = ColIntern.from_checkpoint(
            args.ckpt,
            model_id=args.model_id,
            dtype=args.dtype,
            max_tiles=args.max_tiles,
            quantize=args.quantize,
            device_map=device if torch.device(device).type == "cuda" else None,
            attn_implementation=args.attn_implementation,
            dim=args.dim,
        )
        model.eval()
        run = MiningRun(
            rank,
            world,
            device,
            dtype=resolve_dtype(args.dtype, device, model.quantize),  # the model's (encoding)
            quantize=model.quantize,
            scoring=score_dtype(args.score_dtype, device),
            started=t_start,
        )
        scoring, dtype = run.scoring, run.dtype
        say(
            f"score dtype {dtype_name(scoring)} (--score_dtype {args.score_dtype}; multiplied in "
            f"{dtype_name(matmul_dtype(scoring, device))} on {device}); model dtype {dtype_name(dtype)}"
        )
        timings["load_model"] = time.perf_counter() - start

        start = time.perf_counter()
        data = hub_input(args.train_hub, args.split) if args.train_hub else jsonl_input(args.train_jsonl, args.root)
        timings["hash_pages"] = time.perf_counter() - start
        n_pages = len(data.page_hashes)
        say(f"{len(data.queries)} queries; {data.page_mentions} page references -> {n_pages} distinct pages")
        folder, manifest = cache_folder(args, model, data)
        if rank == 0:
            todo = shards_to_encode(data, folder, manifest, args)
    if world > 1:  # rank 0's list, so that the ranks split one plan even while the first shards are being written
        todo = [todo if rank == 0 else None]
        dist.broadcast_object_list(todo, src=0)
        todo = todo[0]
    shard_counts = {"reused": manifest["n_shards"] - len(todo), "encoded": len(todo)}
    if shard_counts["reused"]:
        say(f"page cache {folder}: reusing {shard_counts['reused']} of {manifest['n_shards']} shard(s)")

    start = time.perf_counter()
    with ranks_agree("encoding pages", world):
        pooling_s = ensure_shards(model, processor, data, folder, todo, args, run)
        sync(device)
    with ranks_agree("writing the page cache's manifest", world):
        if rank == 0:
            write_manifest(folder, manifest)
    timings["encode_pages"] = time.perf_counter() - start

    start = time.perf_counter()
    with ranks_agree("encoding queries", world):
        # whole --query_batch batches per rank: each query is encoded in the same batch as in one process
        batches = rank_share(math.ceil(len(data.queries) / args.query_batch), rank, world)
        own = model.encode_queries(
            processor,
            data.queries[batches.start * args.query_batch : batches.stop * args.query_batch],
            batch_size=args.query_batch,
            progress=rank == 0,
        )
    queries = [q.to(device=device, dtype=scoring) for q in gather_to_all(own, world)]
    sync(device)
    timings["encode_queries"] = time.perf_counter() - start
    page_index = page_index_stats(manifest, args.pool_factor, len(data.page_hashes), model.proj_dim, pooling_s)
    cache = PageCache(folder, manifest, shard_counts, page_index)
    del model

    start = time.perf_counter()
    with ranks_agree("searching", world):
        # every rank scores every positive (Nq pairs, cheap next to the search): the margin filter needs them
        pos_scores = positive_scores(queries, data, folder, args, device, scoring)
        if args.search == "exact":
            result = split_search(queries, data, pos_scores, folder, args, run)
        elif rank == 0:  # FAISS: one index and one search, on rank 0 (docs/mining.md)
            result = faiss_search(queries, data, pos_scores, folder, args, run, timings)
        else:
            result = None
        sync(device)
    if args.search == "exact":
        result = gather_results(result, world)
    timings["search"] = time.perf_counter() - start

    stats = None
    with ranks_agree("writing the output", world):
        if rank == 0:
            stats = write_outputs(args, data, result, ckpt, run, cache, timings)
    return stats


def write_outputs(
    args, data: MiningInput, result: dict, ckpt: dict, run: MiningRun, cache: PageCache, timings: dict
) -> dict:
    """The negatives JSONL and its stats (rank 0)."""
    n_pages = len(data.page_hashes)
    negatives = result["negatives"].tolist()
    rows = [
        {
            "query": q,
            "pos": pos,
            "negs": [data.page_refs[j] for j in negs if j >= 0],
            **(data.fields[i] if data.fields else {}),
        }
        for i, (q, pos, negs) in enumerate(zip(data.queries, data.pos_refs, negatives))
    ]
    write_jsonl(args.out, rows)
    timings["total"] = time.perf_counter() - run.started
    n_negs = torch.tensor([len(r["negs"]) for r in rows])
    stats = {
        "out_jsonl": os.path.abspath(args.out),
        "ckpt": ckpt_name(args.ckpt),
        "model_id": ckpt["meta"]["model_id"] if args.model_id is None else args.model_id,
        "source": data.source,
        "search": args.search,
        **(
            {
                "faiss_index": result["index"],
                "faiss_device": result["faiss_device"],
                "candidates": args.candidates,
                "token_hits": args.token_hits,
            }
            if args.search == "faiss"
            else {}
        ),
        "k": args.k,
        "margin": args.margin,
        "device": str(run.device),
        "dtype": str(run.dtype),
        "score_dtype": {
            "requested": args.score_dtype,
            "used": str(run.scoring),
            "matmul": str(matmul_dtype(run.scoring, run.device)),
        },
        "quantize": run.quantize,
        "page_index": cache.page_index,
        "queries": len(data.queries),
        "page_references": data.page_mentions,
        "distinct_pages": n_pages,
        "duplicates_removed": data.page_mentions - n_pages,
        # rank of the positive among all pages (exact) or among the re-ranked candidates (faiss)
        "positive_rank": rank_metrics(result["rank"]),
        "margin_dropped": {
            "candidates": int(result["dropped"].sum()),
            "queries_with_drops": int((result["dropped"] > 0).sum()),
            "mean_per_query": float(result["dropped"].double().mean()),
        },
        "negatives_per_query": {
            "mean": float(n_negs.double().mean()),
            "min": int(n_negs.min()),
            "queries_short_of_k": int((n_negs < args.k).sum()),
        },
        "cache": {"dir": cache.folder, "shards": cache.manifest["n_shards"], **cache.counts},
        "processes": run.world,
        "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
    }
    write_json(stats_path(args.out), stats)
    m = stats["positive_rank"]
    print(
        f"wrote {len(rows)} rows to {args.out} (stats: {stats_path(args.out)}); positive "
        f"recall@1 {m['recall@1']:.3f} recall@10 {m['recall@10']:.3f} MRR {m['mrr']:.3f}; margin dropped "
        f"{stats['margin_dropped']['candidates']}; {stats['duplicates_removed']} duplicate page(s); "
        f"timings {stats['timings_s']}"
    )
    short = stats["negatives_per_query"]["queries_short_of_k"]
    if short:
        print(
            f"{short} of {len(rows)} queries got fewer than --k {args.k} negatives (min "
            f"{stats['negatives_per_query']['min']}): the margin filter or too few pages left them short"
        )
    return stats


if __name__ == "__main__":
    run_cli(main, parse_args())
