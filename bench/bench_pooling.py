r"""Token pooling: quality, index size and pooling speed of ColIntern's pooling (colintern_scoring.pool_page: Ward on
the unit token vectors) against colpali-engine's HierarchicalTokenPooler (Ward on the rows of 1 - E E^T), on the same
embeddings at the same pool factors, each with and without re-ranking the top --rerank pages with full vectors.

    python bench/bench_pooling.py --ckpt outputs/demo/epoch1/colintern_heads_epoch1.pt \
        --heldout /tmp/q14/heldout/seed*/eval --emb_cache /tmp/q14/heldout_emb.pt

Two sets of embeddings:
- planted (--planted_queries queries x --query_tokens, as many pages of --page_tokens tokens): a page is half
  background (noisy copies of 16 directions every page shares), a third its own content (noisy copies of 32
  page centres), the rest planted query tokens: page i holds noisy copies of 14 of query i's 20 tokens (its
  relevant page), pages i+1 and i+2 of 13 of them each, partly others (distractors), so the top ranks are close and
  pooling can
  swap them;
- held-out synthetic pages (--heldout: eval folders of make_synthetic_data.py, each its own retrieval task, all
  queries pooled into one mean), encoded once with --ckpt and cached in --emb_cache.
For each pool factor it prints nDCG@5 (pooled; pooled + rerank), the fraction of the unpooled nDCG@5, vectors per
page, the page index bytes (fp16, as mining's cache stores them; eval.py holds fp32, twice that), scoring time, and
pooling time per page, ColIntern's and colpali-engine's (one thread each, the same pages) and their ratio.
Scoring goes through eval.py's ColInternEncoder.similarity, the code mteb calls.
"""

import argparse
import glob
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from colintern_scoring import pool_page  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 3, 4, 6], help="pool factors")
    p.add_argument("--rerank", type=int, default=10, help="pages per query re-scored with full vectors")
    p.add_argument("--planted_queries", type=int, default=100, help="planted set: queries (= pages); 0 skips it")
    p.add_argument("--query_tokens", type=int, default=20, help="planted set: tokens per query")
    p.add_argument(
        "--page_tokens",
        type=int,
        nargs=2,
        default=(500, 900),
        metavar=("MIN", "MAX"),
        help="planted set: page lengths, uniform in [MIN, MAX]",
    )
    p.add_argument("--dim", type=int, default=128, help="planted set: embedding size")
    p.add_argument("--ckpt", default=None, help="checkpoint that encodes the held-out pages and queries")
    p.add_argument("--heldout", nargs="*", default=[], help="eval folders (ViDoRe v1 layout) of held-out pages")
    p.add_argument("--emb_cache", default=None, help="file the held-out embeddings are cached in (reused if there)")
    p.add_argument("--no_colpali", action="store_true", help="skip colpali-engine's pooler")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the planted set")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Embeddings


def planted(args) -> list:
    """-> [(queries, pages, qrels)]: one task, query i relevant to page i (see the module docstring)."""
    g = torch.Generator().manual_seed(args.seed)
    n, lq, d = args.planted_queries, args.query_tokens, args.dim
    noisy = lambda x, s: F.normalize(x + s * torch.randn(x.shape, generator=g) / math.sqrt(d), dim=-1)  # noqa: E731
    background = F.normalize(torch.randn(16, d, generator=g), dim=-1)
    queries = [F.normalize(torch.randn(lq, d, generator=g), dim=-1) for _ in range(n)]
    planted_tokens = [[] for _ in range(n)]
    for i, q in enumerate(queries):
        order = torch.randperm(lq, generator=g)
        planted_tokens[i].append(q[order[:14]])
        for j, part in ((i + 1) % n, order[4:17]), ((i + 2) % n, order[7:20]):
            planted_tokens[j].append(q[part])
    pages = []
    for i in range(n):
        length = int(torch.randint(args.page_tokens[0], args.page_tokens[1] + 1, (1,), generator=g))
        mine = torch.cat(planted_tokens[i])
        n_planted = min(length // 6, 4 * len(mine))
        n_background = length // 2
        n_content = length - n_background - n_planted
        centres = F.normalize(torch.randn(32, d, generator=g), dim=-1)
        parts = [
            noisy(background[torch.randint(16, (n_background,), generator=g)], 0.5),
            noisy(centres[torch.randint(32, (n_content,), generator=g)], 0.5),
            noisy(mine[torch.arange(n_planted) % len(mine)], 0.9),
        ]
        page = torch.cat(parts)
        pages.append(page[torch.randperm(len(page), generator=g)])
    return [(queries, pages, {i: {i} for i in range(n)})]


def heldout(args) -> list:
    """-> [(queries, pages, qrels)] per eval folder, encoded with --ckpt (cached in --emb_cache)."""
    if args.emb_cache and os.path.isfile(args.emb_cache):
        cached = torch.load(args.emb_cache, weights_only=True)
        if cached["folders"] == args.heldout:
            print(f"held-out embeddings from {args.emb_cache}")
            return [
                (t["queries"], t["pages"], {int(k): set(v) for k, v in t["qrels"].items()}) for t in cached["tasks"]
            ]
    import datasets

    from colintern_model import ColIntern

    model, processor, _ = ColIntern.from_checkpoint(args.ckpt, dtype="fp32")
    model.eval()
    tasks = []
    start = time.perf_counter()
    for folder in args.heldout:
        load = lambda c: datasets.load_dataset("parquet", data_files=f"{folder}/{c}/*.parquet", split="train")  # noqa
        corpus, queries, qrels = load("corpus"), load("queries"), load("qrels")
        with torch.inference_mode():
            q = model.encode_queries(processor, list(queries["query"]), batch_size=32)
            p = model.encode_pages(processor, list(corpus["image"]), batch_size=8)
        page_row = {cid: j for j, cid in enumerate(corpus["corpus-id"])}
        query_row = {qid: i for i, qid in enumerate(queries["query-id"])}
        rel = {}
        for qid, cid, score in zip(qrels["query-id"], qrels["corpus-id"], qrels["score"]):
            if score > 0:
                rel.setdefault(query_row[qid], set()).add(page_row[cid])
        tasks.append((q, p, rel))
    print(
        f"encoded {sum(len(t[1]) for t in tasks)} held-out pages and {sum(len(t[0]) for t in tasks)} queries "
        f"in {time.perf_counter() - start:.0f} s"
    )
    if args.emb_cache:
        torch.save(
            {
                "folders": args.heldout,
                "tasks": [
                    {"queries": q, "pages": p, "qrels": {str(k): sorted(v) for k, v in r.items()}} for q, p, r in tasks
                ],
            },
            args.emb_cache,
        )
    return tasks


# -----------------------------------------------------------------------------
# Measures


def ndcg_at_5(scores: torch.Tensor, qrels: dict) -> list:
    """Per-query nDCG@5 (binary relevance; ties broken by page order)."""
    out = []
    for i in range(scores.shape[0]):
        rel = qrels.get(i, set())
        if not rel:
            continue
        ranking = sorted(range(scores.shape[1]), key=lambda j: (-float(scores[i, j]), j))[:5]
        dcg = sum(1 / math.log2(r + 2) for r, j in enumerate(ranking) if j in rel)
        out.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(5, len(rel)))))
    return out


def colintern_pooler(pages, factor):
    return [pool_page(p, factor) for p in pages]


def colpali_pooler(pages, factor):
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    if factor == 1:
        return list(pages)
    return HierarchicalTokenPooler().pool_embeddings(list(pages), pool_factor=factor)


def score(queries, pooled, full, rerank) -> tuple:
    """(scores, seconds) through eval.py's ColInternEncoder.similarity, with the full pages kept for rerank."""
    from colintern_mteb import ColInternEncoder

    encoder = ColInternEncoder(None, None, None, pool_factor=2, rerank=rerank)
    if rerank:
        encoder.full_pages = {id(p): f for p, f in zip(pooled, full)}
    start = time.perf_counter()
    scores = encoder.similarity(queries, pooled)
    return scores, time.perf_counter() - start


def colpali_available() -> bool:
    """colpali-engine is a bench-only peer (bench/requirements.txt, installed --no-deps): skipped when absent."""
    return importlib.util.find_spec("colpali_engine") is not None


def run_set(name: str, tasks: list, args) -> None:
    with_colpali = not args.no_colpali and colpali_available()
    if not args.no_colpali and not with_colpali:
        print(
            "colpali-engine is not installed: its pooler is skipped (pip install --no-deps -r bench/requirements.txt)"
        )
    poolers = {"ColIntern": colintern_pooler} | ({"colpali-engine": colpali_pooler} if with_colpali else {})
    n_pages = sum(len(p) for _, p, _ in tasks)
    n_queries = sum(len(r) for _, _, r in tasks)
    dim = tasks[0][1][0].shape[1]
    lengths = [len(p) for _, pages, _ in tasks for p in pages]
    print(
        f"\n{name}: {n_queries} queries, {n_pages} pages of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}), dim {dim}, rerank top {args.rerank}"
    )
    print(
        f"{'pooler':<15} {'F':>2} {'nDCG@5':>7} {'of F=1':>7} {'+rerank':>8} {'of F=1':>7} {'vec/page':>9} "
        f"{'index MiB':>10} {'score s':>8} {'+rr s':>7} {'pool ms/page':>13}"
    )
    base = None
    pool_ms = {}
    for factor in args.factors:
        for label, pooler in poolers.items():
            if factor == 1 and label != "ColIntern":
                continue
            ndcg, ndcg_rr, vectors, seconds, seconds_rr, pool_s = [], [], 0, 0.0, 0.0, 0.0
            for queries, pages, qrels in tasks:
                start = time.perf_counter()
                pooled = pooler(pages, factor)
                pool_s += time.perf_counter() - start
                vectors += sum(len(p) for p in pooled)
                s, t = score(queries, pooled, pages, 0)
                ndcg += ndcg_at_5(s, qrels)
                seconds += t
                if factor > 1:
                    s, t = score(queries, pooled, pages, args.rerank)
                    ndcg_rr += ndcg_at_5(s, qrels)
                    seconds_rr += t
            mean = sum(ndcg) / len(ndcg)
            base = mean if factor == 1 else base
            rr = sum(ndcg_rr) / len(ndcg_rr) if ndcg_rr else mean
            pool_ms[(label, factor)] = 1000 * pool_s / n_pages
            print(
                f"{label:<15} {factor:>2} {mean:7.4f} {mean / base:7.1%} {rr:8.4f} {rr / base:7.1%} "
                f"{vectors / n_pages:9.1f} {vectors * dim * 2 / 2**20:10.2f} {seconds:8.2f} "
                f"{seconds_rr if factor > 1 else float('nan'):7.2f} {pool_ms[(label, factor)]:13.2f}"
            )
    for factor in args.factors:
        if ("colpali-engine", factor) in pool_ms:
            ratio = pool_ms[("colpali-engine", factor)] / pool_ms[("ColIntern", factor)]
            print(f"pool factor {factor}: ColIntern pools {ratio:.1f}x as fast as colpali-engine per page")
    print(f"(nDCG@5 resolution: one query moves the mean by {1 / n_queries:.4f})")


def main(args):
    torch.set_num_threads(args.threads)
    if args.planted_queries:
        run_set("planted embeddings", planted(args), args)
    if args.heldout:
        args.heldout = sorted(f for pattern in args.heldout for f in sorted(glob.glob(pattern)) or [pattern])
        run_set(f"held-out synthetic pages ({len(args.heldout)} tasks, {args.ckpt})", heldout(args), args)


if __name__ == "__main__":
    main(parse_args())
