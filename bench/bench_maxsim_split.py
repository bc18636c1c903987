r"""Where exact MaxSim's time goes on this CPU, at search's shapes: maxsim_tokens' per-block matmul against the max
pass over its similarity block, each timed alone over the same blocks, and their sum against the whole kernel (the
rest: block bookkeeping, threads). Each dtype is measured where it is computed here (colintern_scoring.matmul_dtype:
bf16 runs as bf16 only on a CPU with native bf16, AVX512-BF16 or AMX; elsewhere as fp32 on rounded inputs).

    python bench/bench_maxsim_split.py                       # 64 queries x 20 tokens against 1,000 1,024-token pages
    python bench/bench_maxsim_split.py --pages 200 --repeats 3
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import colintern_scoring as cs


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def split(tokens: torch.Tensor, pages: torch.Tensor, repeats: int) -> dict:
    """Seconds of the whole kernel, of its matmuls alone and of its max passes alone, one thread, the kernel's own
    blocking (cpu_sim_block of the dtype)."""
    t, d = tokens.shape
    np_, lp, _ = pages.shape
    budget = cs.cpu_sim_block(tokens.dtype)
    group = np_ if t * np_ * lp <= budget else max(1, min(np_, int(budget**0.5) // lp))
    rows = max(1, min(t, budget // (group * lp)))
    flat = pages.reshape(np_ * lp, d)
    blocks = [(p0, r0) for p0 in range(0, np_, group) for r0 in range(0, t, rows)]
    buffer = tokens.new_empty(rows * group * lp)

    def matmuls():
        for p0, r0 in blocks:
            p1, r1 = min(np_, p0 + group), min(t, r0 + rows)
            torch.mm(
                tokens[r0:r1],
                flat[p0 * lp : p1 * lp].T,
                out=buffer[: (r1 - r0) * (p1 - p0) * lp].view(r1 - r0, (p1 - p0) * lp),
            )

    def maxes():
        for p0, r0 in blocks:
            p1, r1 = min(np_, p0 + group), min(t, r0 + rows)
            buffer[: (r1 - r0) * (p1 - p0) * lp].view(r1 - r0, p1 - p0, lp).amax(dim=-1)

    whole = best_of(lambda: cs.maxsim_tokens(tokens, pages, workers=1), repeats)
    mm, mx = best_of(matmuls, repeats), best_of(maxes, repeats)
    flops = 2 * t * np_ * lp * d
    return {
        "whole_s": whole,
        "matmul_s": mm,
        "max_s": mx,
        "gflops": flops / whole / 1e9,
        "matmul_gflops": flops / mm / 1e9,
        "blocks": len(blocks),
        "block": (rows, group * lp),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--query_tokens", type=int, default=20)
    p.add_argument("--pages", type=int, default=1000)
    p.add_argument("--page_tokens", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(args.queries * args.query_tokens, args.dim, generator=g), dim=-1)
    pages = torch.nn.functional.normalize(torch.randn(args.pages, args.page_tokens, args.dim, generator=g), dim=-1)
    print(
        f"{args.queries} queries x {args.query_tokens} tokens against {args.pages} pages x {args.page_tokens} "
        f"tokens, D {args.dim}, 1 thread; native bf16: {cs.cpu_has_native_bf16()}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        compute = cs.matmul_dtype(dtype, "cpu")
        r = split(tokens.to(dtype).to(compute), pages.to(dtype).to(compute), args.repeats)
        rest = r["whole_s"] - r["matmul_s"] - r["max_s"]
        print(
            f"{cs.dtype_name(dtype)} (computed in {cs.dtype_name(compute)}), {r['blocks']} blocks of "
            f"{r['block'][0]} x {r['block'][1]}: whole {r['whole_s']:.3f} s ({r['gflops']:.0f} GFLOP/s); matmul "
            f"{r['matmul_s']:.3f} s ({100 * r['matmul_s'] / r['whole_s']:.0f}%, {r['matmul_gflops']:.0f} GFLOP/s), "
            f"max {r['max_s']:.3f} s ({100 * r['max_s'] / r['whole_s']:.0f}%), rest {rest:.3f} s"
        )


if __name__ == "__main__":
    main()
