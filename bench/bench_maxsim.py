r"""MaxSim scorer speed: ColIntern's exact kernel against colpali-engine's `score_multi_vector` and `maxsim-cpu`,
on the same ragged embeddings, each comparison at the same dtype.

    python bench/bench_maxsim.py                                   # CPU: 64 queries x 30 tokens, 500 pages x 700-1300
    python bench/bench_maxsim.py --device cuda --queries 2048 --pages 4000     # a GPU (maxsim-cpu is skipped)

Peers are optional (`pip install --no-deps -r bench/requirements.txt`); a missing one is skipped with a line saying so.
The embeddings have planted relevant pages: query i's 10 relevant pages hold noisy copies of 30, 27, ..., 3 of its
tokens, so its top-10 is well separated (random embeddings give near-tied scores that any rounding reorders).
For each dtype (fp32, bf16) and scorer it prints: the time and useful GFLOP/s (2 x query tokens x page tokens x dim,
padding not counted) of the best and the median of --repeats timed runs, the fraction of this machine's matmul peak
at that dtype, the largest score error against a float64 reference (on the first --check_queries queries: the plain
definition is slow), whether the top-10 of those queries equals the reference's, and the speed ratios against
colpali-engine (and maxsim-cpu) at the same dtype and at fp32, as min / median over the runs (best time against best
time, median against median). A peer too slow to finish within --peer_budget_s (colpali-engine's bf16 on a CPU
without bf16 units) is timed on a subset of the queries, said so.

The matmul peak at a dtype is the best GFLOP/s of square matmuls of 1024, 2048 and 4096 (GPU: 2048, 4096, 8192), best
of --repeats runs each, all printed. Where the CPU has no native bf16 (colintern_scoring.cpu_has_native_bf16), torch's
bf16 matmul is a slow fallback, timed on a small matrix only to say how slow; the peak a bf16 scorer can reach there
is the fp32 one (ColIntern rounds to bf16 and multiplies in fp32). The bench also prints the score dtype mining's
default (--score_dtype auto) picks here, and the default mode's ratio against colpali-engine's fp32.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from colintern_scoring import (
    cpu_has_native_bf16,
    dtype_name,
    matmul_dtype,
    maxsim_scores,
    maxsim_topk,
    score_dtype,
    sync,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-3, "bf16": 0.1}  # max |score error| vs float64: 30 query tokens, rounding per similarity
TOP = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--queries", type=int, default=64, help="number of queries")
    p.add_argument("--query_tokens", type=int, default=30, help="tokens per query")
    p.add_argument("--pages", type=int, default=500, help="number of pages")
    p.add_argument(
        "--page_tokens",
        type=int,
        nargs=2,
        default=(700, 1300),
        metavar=("MIN", "MAX"),
        help="page lengths are uniform in [MIN, MAX]",
    )
    p.add_argument("--dim", type=int, default=128, help="embedding size")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="dtypes to compare at")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs per scorer and per peak matmul (the best and the median are reported)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument(
        "--peer_budget_s",
        type=float,
        default=60.0,
        help="a scorer projected to need longer than this for all queries runs on a subset of them",
    )
    p.add_argument(
        "--check_queries",
        type=int,
        default=64,
        help="queries whose scores and top-10 are checked against the float64 reference",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the embeddings")
    return p.parse_args(argv)


def run_times(fn, device, repeats, warmup=True):
    """(seconds of each of `repeats` runs, after one warm-up run unless told otherwise; the last result)."""
    out = fn() if warmup else None
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def median(values):
    return float(torch.tensor(values, dtype=torch.float64).median())  # the lower middle one for an even count


def matmul_peak(dtype, device, repeats) -> tuple:
    """-> (peak GFLOP/s, {n: best GFLOP/s of an n x n matmul}): the best square matmul of 1024, 2048 and 4096 at
    `dtype` (GPU: 2048-8192), each the best of `repeats` runs: the machine's practical peak for that dtype."""
    sizes = (1024, 2048, 4096) if torch.device(device).type == "cpu" else (2048, 4096, 8192)
    if torch.device(device).type == "cpu" and matmul_dtype(dtype, device) != dtype:
        sizes = (256,)  # no native kernel (torch's fallback is far slower): a small one says how slow
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        times, _ = run_times(lambda: a @ b, device, repeats)
        best[n] = 2 * n**3 / min(times) / 1e9
    return max(best.values()), best


def planted(args):
    """Ragged unit-vector queries and pages; query i's relevant pages hold graded noisy copies of its tokens."""
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = args.page_tokens
    pages = [
        F.normalize(torch.randn(int(n), args.dim, generator=g), dim=-1)
        for n in torch.randint(lo, hi + 1, (args.pages,), generator=g)
    ]
    queries = []
    for i in range(args.queries):
        q = F.normalize(torch.randn(args.query_tokens, args.dim, generator=g), dim=-1)
        for rank in range(TOP):
            slot = i * TOP + rank
            page, offset = pages[slot % args.pages], 32 * (slot // args.pages)
            copies = max(1, round(args.query_tokens * (TOP - rank) / TOP))
            noise = 0.3 * torch.randn(copies, args.dim, generator=g) / args.dim**0.5
            page[offset : offset + copies] = F.normalize(q[:copies] + noise, dim=-1)
        queries.append(q)
    return queries, pages


def reference_scores(queries, pages, device) -> torch.Tensor:
    """float64 MaxSim, one page at a time: the plain definition, no padding, no blocking."""
    q = torch.cat(queries).to(device, torch.float64)
    owner = torch.repeat_interleave(
        torch.arange(len(queries), device=device), torch.tensor([len(x) for x in queries], device=device)
    )
    out = torch.zeros(len(queries), len(pages), dtype=torch.float64, device=device)
    for j, p in enumerate(pages):
        best = (q @ p.to(device, torch.float64).T).amax(dim=1)
        out[:, j].index_add_(0, owner, best)
    return out.cpu()


def scorers(device):
    """name -> (callable(queries, pages, dtype) -> (Nq, Np) or (Nq, TOP) indices, supported dtypes), or a reason
    it is skipped."""
    found = {
        "colintern": (lambda q, p, dtype: maxsim_scores(q, p, device=device, dtype=dtype), DTYPES.values()),
        "colintern-topk": (lambda q, p, dtype: maxsim_topk(q, p, TOP, device=device, dtype=dtype)[1], DTYPES.values()),
    }
    try:
        from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

        score = BaseVisualRetrieverProcessor.score_multi_vector
        found["colpali-engine"] = (
            lambda q, p, dtype: score([x.to(dtype) for x in q], [x.to(dtype) for x in p], device=device),
            DTYPES.values(),
        )
    except ImportError as e:
        found["colpali-engine"] = f"not installed ({e}); pip install --no-deps -r bench/requirements.txt"
    except Exception as e:  # installed without its dependencies (--no-deps) against another stack: name the error
        found["colpali-engine"] = f"installed but cannot be imported here ({type(e).__name__}: {e})"
    if torch.device(device).type != "cpu":
        found["maxsim-cpu"] = "CPU only"
    else:
        try:
            import maxsim_cpu
            import numpy as np

            def run(q, p, dtype):
                docs = [x.numpy() for x in p]
                return torch.from_numpy(np.stack([maxsim_cpu.maxsim_scores_variable(x.numpy(), docs) for x in q]))

            found["maxsim-cpu"] = (run, [torch.float32])  # float32 numpy only
        except ImportError as e:
            found["maxsim-cpu"] = f"not installed ({e}); pip install --no-deps -r bench/requirements.txt"
    return found


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    queries, pages = planted(args)
    flops_per_query = 2 * args.query_tokens * sum(len(p) for p in pages) * args.dim
    on = torch.device(device)
    print(
        f"device {device} ({torch.cuda.get_device_name(on) if on.type == 'cuda' else os.cpu_count()} "
        f"{'' if on.type == 'cuda' else 'cores, '}torch threads {torch.get_num_threads()}); {len(queries)} queries x "
        f"{args.query_tokens} tokens, {len(pages)} pages x {args.page_tokens[0]}-{args.page_tokens[1]} tokens, "
        f"dim {args.dim}: {flops_per_query * len(queries) / 1e9:.1f} GFLOP per full scoring"
    )
    peaks, native = {}, {}
    for name, dtype in DTYPES.items():
        peaks[name], by_size = matmul_peak(dtype, device, args.repeats)
        native[name] = matmul_dtype(dtype, device) == dtype
        note = "" if native[name] else " (no native matmul at this dtype on this machine: torch's fallback)"
        sizes = ", ".join(f"{n}: {g:.1f}" for n, g in by_size.items())
        print(
            f"matmul peak {name}: {peaks[name]:.1f} GFLOP/s (square n x n, best of {args.repeats} runs each: "
            f"{sizes}){note}"
        )
    # the peak a scorer at that dtype can reach here: without a native bf16 matmul, the fp32 one (rounded bf16
    # inputs computed in fp32 are what ColIntern does there)
    usable = {name: peaks[name] if native[name] else peaks["fp32"] for name in DTYPES}
    default = dtype_name(score_dtype("auto", device))
    if on.type == "cpu":
        print(
            f"default mode (mining's --score_dtype auto): {default} (native bf16 on this CPU: "
            f"{cpu_has_native_bf16()}; torch.ops.mkldnn._is_mkldnn_bf16_supported() "
            f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()})"
        )
    else:
        print(f"default mode (mining's --score_dtype auto): {default}")
    checked = min(args.check_queries, len(queries))
    reference = reference_scores(queries[:checked], pages, device)
    ref_top = reference.topk(TOP, dim=1).indices
    planted_top = torch.tensor([[(i * TOP + r) % args.pages for r in range(TOP)] for i in range(checked)])
    print(f"reference top-{TOP} = planted pages for {(ref_top == planted_top).all(1).float().mean():.0%} of queries")
    q_dev = [q.to(device) for q in queries]
    p_dev = [p.to(device) for p in pages]
    results = {}  # (scorer, dtype) -> (best GFLOP/s, median GFLOP/s)
    for name, entry in scorers(device).items():
        if isinstance(entry, str):
            print(f"{name}: skipped, {entry}")
            continue
        fn, supported = entry
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            if dtype not in supported:
                print(f"{name} {dname}: skipped, the package takes float32 only")
                continue
            n = min(len(queries), 8)  # a few queries first: do all of them fit the budget?
            start = time.perf_counter()
            out = fn(q_dev[:n], p_dev, dtype)
            sync(device)
            times = [time.perf_counter() - start]
            if times[0] * len(queries) / n <= args.peer_budget_s:
                n = len(queries)
                times, out = run_times(lambda: fn(q_dev, p_dev, dtype), device, args.repeats, warmup=False)
            best, mid = min(times), median(times)
            gflops, gflops_mid = flops_per_query * n / best / 1e9, flops_per_query * n / mid / 1e9
            if name.endswith("topk"):
                top, err = out.cpu(), float("nan")
            else:
                top = out.float().cpu().topk(TOP, dim=1).indices
                m = min(n, checked)
                err = float((out[:m].double().cpu() - reference[:m]).abs().max())
            m = min(n, checked)
            same_top = float((top[:m] == ref_top[:m]).all(dim=1).float().mean())
            results[(name, dname)] = (gflops, gflops_mid)
            subset = f" (on {n} of {len(queries)} queries: too slow for all)" if n < len(queries) else ""
            tol = TOLERANCE[dname]
            err_text = "n/a (top-k only)" if err != err else f"{err:.2e} ({'within' if err <= tol else 'OVER'} {tol})"
            peak_name = dname if native[dname] else "fp32"
            print(
                f"{name} {dname}: {best * len(queries) / n:.3f} s, {gflops:.1f} GFLOP/s "
                f"= {gflops / usable[dname]:.0%} of the {peak_name} matmul peak (median of {len(times)}: "
                f"{mid * len(queries) / n:.3f} s, {gflops_mid:.1f} GFLOP/s, {gflops_mid / usable[dname]:.0%}); "
                f"max |score error| {err_text}; "
                f"top-{TOP} identical to the reference for {same_top:.0%} of queries{subset}"
            )

    def ratio(a, b):
        (a_min, a_mid), (b_min, b_mid) = results[a], results[b]
        return f"{a_min / b_min:.2f}x / {a_mid / b_mid:.2f}x (min / median)"

    for dname in args.dtypes:
        for ours in ("colintern", "colintern-topk"):
            for peer in ("colpali-engine", "maxsim-cpu"):
                if (ours, dname) in results and (peer, dname) in results:
                    print(f"ratio {ours} / {peer} at {dname}: {ratio((ours, dname), (peer, dname))}")
    for ours in ("colintern", "colintern-topk"):
        if (ours, default) in results and ("colpali-engine", "fp32") in results:
            print(
                f"ratio {ours} default mode ({default}) / colpali-engine fp32: "
                f"{ratio((ours, default), ('colpali-engine', 'fp32'))}"
            )
    return results


if __name__ == "__main__":
    main(parse_args())
