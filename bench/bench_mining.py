r"""Mining benchmark: where the time goes (encode pages / encode queries / search) when mine_hard_negatives.py mines
a few thousand synthetic pages, exact and FAISS, and how well FAISS agrees with exact.

    python bench/bench_mining.py                                   # tiny random InternVL on the CPU, 2,000 pages
    python bench/bench_mining.py --size 1b --device cuda --pages 2000 --page_size 896 896 --max_tiles 4   # a GPU
    python bench/bench_mining.py --encode_only --size 1b --device cuda --pages 512 --page_size 896 896 --doc_batch 32

It builds a random InternVL (`make_tiny_model.build`: 'tiny' for CPU, '1b' = InternVL3.5-1B shapes), saves an
untrained ColIntern checkpoint (seeded heads + LoRA), renders --pages pages with PIL (a keyword title on a token-grid
position, a few layouts of text lines, boxes and bars; --duplicates of them repeated byte for byte), writes them as a
hub-layout dataset, then runs the real CLI: exact search, the same again (every shard from the cache), and FAISS.
Prints one line a figure. Everything goes under --work_dir (default: a temporary folder, removed afterwards).

--encode_only times the page-encoding part of mining alone, in memory (no checkpoint, dataset, cache or search, so
neither datasets nor faiss is needed): the same random ColIntern (seeded heads + LoRA r 8) encodes --pages rendered
pages in batches of --doc_batch, and it prints (1) ColInternProcessor.process_pages on one CPU thread, pages/s
(mining does this in --num_workers DataLoader workers); (2) the model alone, forward_pages + unpad to fp16 as
mine_hard_negatives.encode_shard does, on pages processed ahead: pages/s, page tokens/s, and on CUDA TFLOP/s and MFU
(forward model FLOPs as bench_train.py counts them, against --peak_tflops) and the DataLoader workers it takes to
keep the model fed; (3) ColIntern.encode_pages end to end (processing inline, one thread), pages/s.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import make_tiny_model  # noqa: E402
import mine_hard_negatives as mine  # noqa: E402
from bench import bench_train  # noqa: E402
from colintern_model import ColIntern, ColInternProcessor, LoraSettings, resolve_dtype, save_checkpoint, unpad  # noqa: E402
from colintern_scoring import sync  # noqa: E402

LAYOUTS = ("lines", "boxes", "bars", "two_columns")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=2000, help="distinct pages (and as many queries)")
    p.add_argument(
        "--duplicates",
        type=float,
        default=0.05,
        help="fraction of extra rows that repeat an earlier page byte for byte (deduplicated by mining)",
    )
    p.add_argument(
        "--size",
        default="tiny",
        choices=sorted(make_tiny_model.SIZES),
        help="random InternVL: tiny (CPU) or 1b (InternVL3.5-1B shapes, for a GPU)",
    )
    p.add_argument("--tile", type=int, default=None, help="tile side in px (default 224 tiny, 448 1b)")
    p.add_argument(
        "--page_size",
        type=int,
        nargs=2,
        default=None,
        metavar=("W", "H"),
        help="page size in px (default 1x2 tiles: 224x448 tiny, 448x896 1b)",
    )
    p.add_argument("--max_tiles", type=int, default=4, help="mining --max_tiles")
    p.add_argument("--device", default=None, help="mining --device (default cuda if available)")
    p.add_argument("--dtype", default="auto", help="mining --dtype")
    p.add_argument("--k", type=int, default=8, help="mining --k")
    p.add_argument("--doc_batch", type=int, default=16, help="mining --doc_batch")
    p.add_argument("--query_batch", type=int, default=128, help="mining --query_batch")
    p.add_argument("--num_workers", type=int, default=1, help="mining --num_workers")
    p.add_argument("--shard_pages", type=int, default=512, help="mining --shard_pages")
    p.add_argument("--candidates", type=int, default=100, help="mining --candidates (FAISS)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--work_dir", default=None, help="keep the model, data and outputs here (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0, help="seed for pages and weights")
    p.add_argument(
        "--planted_queries",
        type=int,
        default=500,
        help="queries of the FAISS-vs-exact recall check on planted embeddings (it needs --pages x "
        "page tokens >= planted_queries x --k x query tokens)",
    )
    p.add_argument(
        "--encode_only",
        action="store_true",
        help="time only the page encoding (processing, model, encode_pages), in memory; see above",
    )
    p.add_argument(
        "--nproc",
        type=int,
        nargs="+",
        default=None,
        help="instead: exact mining under torchrun with each of these process counts (fresh page cache "
        "each), time per phase and the ratio to the first; outputs must be byte-identical",
    )
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=989.0,
        help="--encode_only on CUDA: accelerator peak for MFU, TFLOP/s (H100/H200 dense bf16: 989)",
    )
    return p.parse_args(argv)


def render_page(index: int, size, tile: int, rng: random.Random) -> Image.Image:
    """A page with a keyword title snapped to the token grid and one of a few layouts below it."""
    w, h = size
    page = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    unit = tile // 8  # 28 px at tile 224: one image token covers 2x2 patches of 14 px
    draw.text((unit, unit), f"topic {index}", fill="black", font=ImageFont.load_default(size=tile // 6))
    layout = LAYOUTS[index % len(LAYOUTS)]
    top = 3 * unit
    for line in range((h - top) // unit - 1):
        y = top + line * unit
        if layout == "lines":
            draw.line((unit, y, unit + rng.randrange(w // 4, w - 2 * unit), y), fill="gray", width=3)
        elif layout == "boxes" and line % 3 == 0:
            draw.rectangle((unit, y, rng.randrange(w // 3, w - unit), y + 2 * unit), outline="black", width=2)
        elif layout == "bars":
            draw.rectangle((unit, y, unit + rng.randrange(4, w - 2 * unit), y + unit // 2), fill=(70, 110, 180))
        elif layout == "two_columns":
            for x0 in (unit, w // 2 + unit // 2):
                draw.line((x0, y, x0 + rng.randrange(unit, w // 2 - unit), y), fill="gray", width=3)
    return page


def build_inputs(args, work: str, tile: int, size) -> dict:
    import datasets

    model_dir, ckpt = os.path.join(work, "model"), os.path.join(work, "ckpt", "colintern_heads_epoch1.pt")
    start = time.perf_counter()
    backbone, processor = make_tiny_model.build(args.size, tile=tile, seed=args.seed)
    backbone.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    del backbone
    torch.manual_seed(args.seed)
    model, _ = ColIntern.from_pretrained(model_dir, lora=LoraSettings(r=8, alpha=8), max_tiles=args.max_tiles)
    save_checkpoint(ckpt, model, epoch=1)
    del model
    print(f"model: random {args.size} InternVL, tile {tile}px, saved in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    rng = random.Random(args.seed)
    images = [render_page(i, size, tile, rng) for i in range(args.pages)]
    copies = [rng.randrange(args.pages) for _ in range(round(args.duplicates * args.pages))]
    rows = list(range(args.pages)) + copies
    ds = datasets.Dataset.from_dict(
        {"query": [f"Which page is about topic {i}?" for i in rows], "image": [images[i] for i in rows]}
    )
    ds = ds.cast_column("image", datasets.Image())
    data_dir = os.path.join(work, "data")
    os.makedirs(os.path.join(data_dir, "data"), exist_ok=True)
    ds.to_parquet(os.path.join(data_dir, "data", "train-00000-of-00001.parquet"))
    print(
        f"data: {len(rows)} rows ({args.pages} distinct pages {size[0]}x{size[1]}, {len(copies)} repeats), "
        f"rendered and written in {time.perf_counter() - start:.1f} s"
    )
    return {"ckpt": ckpt, "data": data_dir}


def mine_flags(args, inputs, out: str, *extra) -> list[str]:
    """mine_hard_negatives.py's flags for this bench's settings, writing `out`."""
    flags = [
        "--ckpt",
        inputs["ckpt"],
        "--train_hub",
        inputs["data"],
        "--split",
        "train",
        "--out",
        out,
        "--k",
        args.k,
        "--max_tiles",
        args.max_tiles,
        "--doc_batch",
        args.doc_batch,
        "--query_batch",
        args.query_batch,
        "--num_workers",
        args.num_workers,
        "--shard_pages",
        args.shard_pages,
        "--dtype",
        args.dtype,
        *(["--device", args.device] if args.device else []),
        *extra,
    ]
    return [str(f) for f in flags]


def run(args, inputs, work, name, *extra):
    return mine.main(mine.parse_args(mine_flags(args, inputs, os.path.join(work, f"{name}.jsonl"), *extra)))


def run_processes(args, inputs, work, nproc: int) -> dict:
    """Exact mining under torchrun --nproc_per_node nproc (plain python for 1), its own cache -> the stats."""
    out = os.path.join(work, f"nproc{nproc}.jsonl")
    flags = mine_flags(args, inputs, out, "--cache_dir", os.path.join(work, f"cache{nproc}"))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)}
    subprocess.run(
        [sys.executable, *launcher, os.path.join(ROOT, "mine_hard_negatives.py"), *flags],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    with open(mine.stats_path(out)) as f:
        return json.load(f)


def compare_processes(args, inputs, work) -> None:
    phases = ("load_model", "hash_pages", "encode_pages", "encode_queries", "search", "total")
    first, outputs = None, {}
    for nproc in args.nproc:
        t = run_processes(args, inputs, work, nproc)["timings_s"]
        first = first or t
        outputs[nproc] = open(os.path.join(work, f"nproc{nproc}.jsonl"), "rb").read()
        print(
            f"{nproc} process(es): "
            + ", ".join(f"{k} {t[k]:.2f} s ({first[k] / max(t[k], 1e-9):.2f}x)" for k in phases)
        )
    same = all(o == outputs[args.nproc[0]] for o in outputs.values())
    print(f"outputs byte-identical across process counts: {same}")


def page_tokens(stats) -> int:
    with open(os.path.join(stats["cache"]["dir"], "manifest.json")) as f:
        return sum(s["tokens"] for s in json.load(f)["shards"].values())


def report(name, stats, page_tokens, query_tokens, dim):
    """page_tokens, query_tokens: totals over all distinct pages / all queries."""
    t = stats["timings_s"]
    n_pages, n_queries = stats["distinct_pages"], stats["queries"]
    flops = 2 * query_tokens * page_tokens * dim
    print(
        f"{name}: encode pages {t['encode_pages']:.2f} s ({n_pages / max(t['encode_pages'], 1e-9):.1f} pages/s), "
        f"encode queries {t['encode_queries']:.2f} s ({n_queries / t['encode_queries']:.0f} queries/s), "
        f"search {t['search']:.2f} s, total {t['total']:.2f} s"
    )
    if stats["search"] == "exact":
        print(
            f"{name}: search = {flops / t['search'] / 1e9:.1f} GFLOP/s of MaxSim (all queries x all pages, "
            f"{query_tokens / n_queries:.0f} query tokens x {page_tokens / n_pages:.0f} page tokens)"
        )
    else:
        print(
            f"{name}: index {stats['faiss_index']} built in {t['build_index']:.2f} s, FAISS search "
            f"{t['faiss_search']:.2f} s, exact re-rank of {stats['candidates']} candidates {t['rerank']:.2f} s"
        )
    share = {k: t[k] / t["total"] for k in ("encode_pages", "encode_queries", "search")}
    print(
        f"{name}: time split "
        + ", ".join(f"{k} {v:.0%}" for k, v in share.items())
        + f"; positive recall@1 {stats['positive_rank']['recall@1']:.3f}, cache reused {stats['cache']['reused']} / "
        f"encoded {stats['cache']['encoded']} shard(s)"
    )


def planted_recall(args, page_len: int, query_len: int, dim: int, n_queries: int = 500) -> float:
    """FAISS candidates + exact re-rank (the --search faiss path) against exact top-k, at this run's scale, on
    embeddings with planted relevant pages: query i's k relevant pages hold noisy copies of k, k-1, ... 1 blocks of
    its tokens, so the exact top-k is well defined (an untrained model's scores are near ties)."""
    import torch.nn.functional as F

    from colintern_scoring import maxsim_topk

    g = torch.Generator().manual_seed(args.seed)
    pages = [F.normalize(torch.randn(page_len, dim, generator=g), dim=-1) for _ in range(args.pages)]
    queries = []
    for i in range(n_queries):
        q = F.normalize(torch.randn(query_len, dim, generator=g), dim=-1)
        for rank in range(args.k):
            copies = max(1, query_len * (args.k - rank) // args.k)
            slot = i * args.k + rank  # a page planted for several queries holds each one's copies apart
            page, offset = pages[slot % args.pages], query_len * (slot // args.pages)
            if offset + copies > page_len:
                raise ValueError(
                    f"{n_queries} queries x {args.k} planted pages do not fit {args.pages} pages of "
                    f"{page_len} tokens: raise --pages"
                )
            noise = 0.3 * torch.randn(copies, dim, generator=g) / dim**0.5
            page[offset : offset + copies] = F.normalize(q[:copies] + noise, dim=-1)
        queries.append(q)
    start = time.perf_counter()
    exact = maxsim_topk(queries, pages, args.k)[1]
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    index, token_page, spec = mine.build_token_index(lambda: iter([(0, pages)]))
    cands = mine.faiss_candidates(queries, index, token_page, len(pages), args.candidates, token_hits=64)
    valid = cands >= 0
    q_idx = torch.arange(n_queries)[:, None].expand_as(cands)[valid]
    scores = torch.full(cands.shape, float("-inf"))
    scores[valid] = mine.score_pairs(queries, pages, (q_idx, cands[valid]), "cpu", torch.float32)
    found = cands.gather(1, scores.topk(args.k, dim=1).indices)
    faiss_s = time.perf_counter() - start
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, found)) / exact.numel()
    print(
        f"planted embeddings ({n_queries} queries x {query_len} tokens, {args.pages} pages x {page_len} tokens): "
        f"FAISS {spec} + exact re-rank of {args.candidates} candidates, top-{args.k} recall vs exact {recall:.3f} "
        f"({faiss_s:.2f} s; exact top-k {exact_s:.2f} s)"
    )
    return recall


def encode_only(args, tile: int, size) -> dict:
    """The page-encoding part of mining, in memory (see the module docstring) -> the figures, by name."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    backbone, hf_processor = make_tiny_model.build(args.size, tile=tile, seed=args.seed)
    processor = ColInternProcessor(hf_processor, max_tiles=args.max_tiles)
    torch.manual_seed(args.seed)
    model = ColIntern(
        backbone.to(device=device, dtype=dtype),
        lora=LoraSettings(r=8, alpha=8),
        max_tiles=args.max_tiles,
        **processor.pixel_normalisation(),
    ).eval()
    rng = random.Random(args.seed)
    images = [render_page(i, size, tile, rng) for i in range(args.pages)]
    print(
        f"encode only: random {args.size} InternVL on {device} ({dtype}), {args.pages} pages {size[0]}x{size[1]}, "
        f"--max_tiles {args.max_tiles}, --doc_batch {args.doc_batch}, torch threads {torch.get_num_threads()}; "
        f"built and rendered in {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    chunks = [images[i : i + args.doc_batch] for i in range(0, len(images), args.doc_batch)]
    start = time.perf_counter()
    batches = [processor.process_pages(chunk) for chunk in chunks]
    processing = len(images) / (time.perf_counter() - start)
    tiles = sum(b["pixel_values"].shape[0] for b in batches) / len(images)
    print(
        f"processing (ColInternProcessor.process_pages, one CPU thread): {processing:.1f} pages/s, "
        f"{tiles:.1f} tiles/page",
        flush=True,
    )

    def forward(batch):
        emb, mask = model.forward_pages(batch)
        return unpad(emb.to(torch.float16), mask)

    with torch.inference_mode():
        forward(batches[0])  # warm-up: kernels, allocator
        sync(device)
        start = time.perf_counter()
        tokens = 0
        for batch in batches:
            tokens += sum(len(e) for e in forward(batch))
        sync(device)
    seconds = time.perf_counter() - start
    figures = {"processing_pages_s": processing, "model_pages_s": len(images) / seconds}
    line = (
        f"model (forward_pages + unpad to fp16, pages processed ahead): {figures['model_pages_s']:.1f} pages/s, "
        f"{tokens / seconds:.0f} page tokens/s ({tokens / len(images):.0f} kept per page)"
    )
    if device.type == "cuda":
        flops = 0.0
        for batch in batches:
            vision, lm, n_tokens = bench_train.forward_flops(model, batch)
            flops += vision + lm + 2 * model.hidden_size * model.proj_dim * n_tokens
        achieved = flops / seconds
        figures["mfu"] = achieved / (args.peak_tflops * 1e12)
        line += f", {achieved / 1e12:.1f} TFLOP/s, MFU {figures['mfu']:.1%}"
    line += f"; keeping it fed takes ~{figures['model_pages_s'] / processing:.1f} DataLoader workers"
    print(line, flush=True)

    start = time.perf_counter()
    model.encode_pages(processor, images, batch_size=args.doc_batch)
    sync(device)
    figures["encode_pages_s"] = len(images) / (time.perf_counter() - start)
    print(
        f"ColIntern.encode_pages end to end (processing inline, one thread): {figures['encode_pages_s']:.1f} pages/s",
        flush=True,
    )
    return figures


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    tile = args.tile or (224 if args.size == "tiny" else 448)
    size = tuple(args.page_size or (tile, 2 * tile))
    if args.encode_only:
        return encode_only(args, tile, size)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_mining_")
    try:
        inputs = build_inputs(args, work, tile, size)
        if args.nproc:
            return compare_processes(args, inputs, work)
        exact = run(args, inputs, work, "exact")
        tokens = page_tokens(exact)
        from colintern_model import ColInternProcessor

        processor = ColInternProcessor.from_pretrained(os.path.join(work, "model"))
        queries = [f"Which page is about topic {i}?" for i in range(exact["queries"])]
        query_tokens = int(processor.process_queries(queries)["attention_mask"].sum())
        print(
            f"device {exact['device']}, dtype {exact['dtype']}, torch threads {torch.get_num_threads()}; "
            f"{exact['queries']} queries, {exact['distinct_pages']} distinct pages "
            f"({exact['duplicates_removed']} duplicates removed), {tokens / exact['distinct_pages']:.0f} tokens/page"
        )
        dim = 128
        report("exact", exact, tokens, query_tokens, dim)
        again = run(args, inputs, work, "exact_again")
        report("exact, cached shards", again, tokens, query_tokens, dim)
        faiss_stats = run(args, inputs, work, "faiss", "--search", "faiss", "--candidates", args.candidates)
        report("faiss", faiss_stats, tokens, query_tokens, dim)
        rows = {
            name: [json.loads(line) for line in open(os.path.join(work, f"{name}.jsonl"))]
            for name in ("exact", "faiss")
        }
        hits = sum(len(set(a["negs"]) & set(b["negs"])) for a, b in zip(rows["exact"], rows["faiss"]))
        total = sum(len(a["negs"]) for a in rows["exact"])
        print(
            f"faiss negatives that exact search also wrote (untrained model: near-tied scores): "
            f"{hits / max(total, 1):.3f} ({hits} of {total})"
        )
        planted_recall(
            args,
            round(tokens / exact["distinct_pages"]),
            round(query_tokens / exact["queries"]),
            dim,
            n_queries=args.planted_queries,
        )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(parse_args())
