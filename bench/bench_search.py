"""search.py's speed and size: indexing pages/s (tiny model, real PDFs), query latency over 1k and 10k pages
(random 1,024-token pages, exact and pooled first stage + rerank), index bytes per page, and whether each top-K
equals a float64 MaxSim of the same embeddings (planted queries, so the best pages stand clear).

    python bench/bench_search.py                      # 24 pages indexed; scoring at 1,000 and 10,000 pages
    python bench/bench_search.py --pages 64 --sizes 1000

The pooled first stage scores each page's first max(1, 1024 // F) vectors as stand-ins for its pooled ones: the
first stage's cost depends on the shapes alone, and Ward pooling 10,000 random 1,024-token pages would dominate the
run (bench_pooling.py measures pooling). Index bytes per page come from a real chunk with real pooling.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import search  # noqa: E402
from colintern_model import ColIntern, LoraSettings, save_checkpoint  # noqa: E402

DIM, PAGE_TOKENS, QUERY_TOKENS = 128, 1024, 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=24, help="pages indexed with the tiny model")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="page counts for the scoring part")
    p.add_argument("--queries", type=int, default=8, help="planted queries per size (latency: one at a time)")
    p.add_argument("--pool_factor", type=int, default=3)
    p.add_argument("--rerank", type=int, default=100)
    p.add_argument("--top", type=int, default=10)
    return p.parse_args()


def bench_indexing(n_pages: int, tmp: str) -> None:
    import make_tiny_model
    from make_synthetic_data import WORDS, render_keyword_page

    model, processor = make_tiny_model.build("tiny", tile=224, seed=0)
    model.save_pretrained(f"{tmp}/tiny")
    processor.save_pretrained(f"{tmp}/tiny")
    torch.manual_seed(0)
    colintern, _ = ColIntern.from_pretrained(f"{tmp}/tiny", lora=LoraSettings(r=4, alpha=4), max_tiles=1)
    save_checkpoint(f"{tmp}/ckpt.pt", colintern, epoch=1)
    os.makedirs(f"{tmp}/docs")
    pages = [render_keyword_page(WORDS[i % len(WORDS)], variant=i) for i in range(n_pages)]
    for d in range(0, n_pages, 8):  # PDFs of 8 pages
        pages[d].save(f"{tmp}/docs/doc{d:04d}.pdf", "PDF", save_all=True, append_images=pages[d + 1 : d + 8])
    flags = ["index", "--ckpt", f"{tmp}/ckpt.pt", "--docs", f"{tmp}/docs", "--index", f"{tmp}/index", "--device", "cpu"]
    first = search.main(search.parse_args(flags))
    start = time.perf_counter()
    again = search.main(search.parse_args(flags))
    rerun_s = time.perf_counter() - start
    print(
        f"indexing (tiny model, 224 pt pages at 144 dpi, whole command incl. model load): {first['pages']} pages "
        f"in {first['seconds']:.1f} s = {first['pages'] / first['seconds']:.2f} pages/s; unchanged rerun "
        f"{rerun_s:.2f} s ({again['documents_encoded']} documents encoded)"
    )


def random_pages(n: int, g: torch.Generator) -> list:
    return [torch.nn.functional.normalize(torch.randn(PAGE_TOKENS, DIM, generator=g), dim=-1).half() for _ in range(n)]


def planted_queries(pages: list, n: int, keep: int, g: torch.Generator) -> tuple:
    """Queries of QUERY_TOKENS noisy copies of tokens among the first `keep` of page targets[i]."""
    targets = torch.randperm(len(pages), generator=g)[:n].tolist()
    queries = []
    for t in targets:
        rows = torch.randint(0, keep, (QUERY_TOKENS,), generator=g)
        q = pages[t][rows].float() + 0.5 * torch.randn(QUERY_TOKENS, DIM, generator=g) / DIM**0.5
        queries.append(torch.nn.functional.normalize(q, dim=-1))
    return queries, targets


def float64_topk(queries: list, pages: list, k: int) -> list:
    """The reference: every query x every page in float64, page by page block."""
    scores = torch.empty(len(queries), len(pages), dtype=torch.float64)
    q = torch.cat(queries).double()  # (Nq * Lq, D)
    for p0 in range(0, len(pages), 128):
        block = torch.stack(pages[p0 : p0 + 128]).double()  # (n, L, D)
        best = torch.einsum("td,pld->tpl", q, block).amax(dim=-1)  # (T, n)
        scores[:, p0 : p0 + len(block)] = best.view(len(queries), QUERY_TOKENS, -1).sum(dim=1)
    return scores.topk(k, dim=1).indices.tolist()


def bench_scoring(n: int, args, g: torch.Generator) -> None:
    keep = max(1, PAGE_TOKENS // args.pool_factor)
    full = random_pages(n, g)
    pooled = [p[:keep] for p in full]  # stand-ins for pooled vectors: see the docstring
    queries, targets = planted_queries(full, args.queries, keep, g)
    reference = float64_topk(queries, full, args.top)
    variants = (
        ("exact, fp16 as stored", search.IndexVectors([], full, [], []), True),
        ("exact, pages held in fp32", search.IndexVectors([], [p.float() for p in full], [], []), True),
        (f"pooled F{args.pool_factor} + rerank {args.rerank}", search.IndexVectors([], full, [], pooled), False),
    )
    for name, vectors, exact in variants:
        settings = argparse.Namespace(top=args.top, rerank=args.rerank, exact=exact)
        times, hits = [], []
        for q in queries:  # one question at a time, as a user asks
            start = time.perf_counter()
            hits += search.search_local([q], vectors, settings, "cpu", torch.float32)
            times.append(time.perf_counter() - start)
        same = sum([j for j, _ in h] == r for h, r in zip(hits, reference))
        first = sum(h[0][0] == r[0] for h, r in zip(hits, reference))
        found = sum(h[0][0] == t for h, t in zip(hits, targets))
        # beyond the planted page, random pages are near-ties: a pooled first stage need not hand the same ones on
        print(
            f"{n} pages x {PAGE_TOKENS} tokens, {name}: query latency median {statistics.median(times) * 1e3:.0f} "
            f"ms (min {min(times) * 1e3:.0f}); top-{args.top} equal to float64 MaxSim for {same}/{len(queries)} "
            f"queries, top-1 for {first}/{len(queries)}; planted page first for {found}/{len(queries)}"
        )
        del vectors


def bench_bytes(args, tmp: str, g: torch.Generator) -> None:
    from PIL import Image

    pages = random_pages(16, g)
    it = iter(pages)
    frames = [Image.new("RGB", (8, 8)) for _ in pages]  # the pages' images: the vectors are planted below
    frames[0].save(f"{tmp}/doc.tiff", save_all=True, append_images=frames[1:])
    doc = search.Document(f"{tmp}/doc.tiff", "b" * 64, 0, 0, len(pages))
    settings = argparse.Namespace(chunk_pages=16, doc_batch=8, dpi=144)

    class Bar:
        def update(self, k):
            pass

    for factor in (1, args.pool_factor):
        index = f"{tmp}/bytes{factor}"
        search.encode_document(doc, index, lambda batch: [next(it).float() for _ in batch], factor, settings, Bar())
        it = iter(pages)
        per_page = search.folder_bytes(index) / len(pages)
        print(
            f"index bytes per {PAGE_TOKENS}-token page (pool factor {factor}, fp16 full"
            f"{' + pooled' if factor > 1 else ''}): {per_page:,.0f}"
        )


def main():
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"threads {torch.get_num_threads()}; torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bench_indexing(args.pages, tmp)
        bench_bytes(args, tmp, g)
    for n in args.sizes:
        bench_scoring(n, args, g)


if __name__ == "__main__":
    main()
