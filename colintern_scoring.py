"""Exact MaxSim scoring on a CPU or a GPU (the score dtype, blocked kernels, top-k), and token pooling."""

import contextlib
import functools
import math
import platform
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from colintern_cli import UserValueError

# -----------------------------------------------------------------------------
# Exact MaxSim: every query token against every page token, in blocks that fit the cache (CPU) or memory (GPU)


def pad_queries(queries: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero-pad ragged queries to (Nq, Lq, D). Exact: a zero query vector's best similarity is 0."""
    return torch.nn.utils.rnn.pad_sequence(list(queries), batch_first=True)


def pad_pages(
    pages: Sequence[torch.Tensor], dtype: torch.dtype | None = None, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Pad ragged pages to (Np, Lp, D) by repeating each page's own first token: a copy never changes the max,
    so the padded batch scores exactly, with no mask pass (zero-padding would win a max over negative scores).
    `dtype`: the padded batch's (default the pages'); the copy converts, no extra pass. `buffer`: a flat tensor of
    that dtype, at least Np x Lp x D long, to pad into (the result is a view of it) instead of a new tensor."""
    length = max(p.shape[0] for p in pages)
    shape = (len(pages), length, pages[0].shape[1])
    if buffer is None:
        out = pages[0].new_empty(shape, dtype=dtype)
    else:
        out = buffer[: math.prod(shape)].view(shape)
    for i, p in enumerate(pages):
        if p.shape[0] == 0:
            raise UserValueError(f"page {i} has no tokens to score")
        out[i, : p.shape[0]] = p
        out[i, p.shape[0] :] = p[0]
    return out


# Similarity values per block in maxsim_tokens. On a CPU a block must stay in cache, or the matmul waits on memory
# (docs/benchmarks.md has the block sizes measured). A bf16 block (native bf16 only: the matmul writes bf16) takes
# half the bytes, so the same cache holds twice the values. A GPU wants big blocks.
CPU_SIM_BLOCK = 1 << 18
CPU_SIM_BLOCK_BF16 = 1 << 19
GPU_SIM_BLOCK = 1 << 28
PAGE_CHUNK_TOKENS = 1 << 15  # page tokens padded together (sorted by length, so little padding)
QUERY_BLOCK_TOKENS = 1 << 15  # query tokens scored together by maxsim_topk (bounds its (tokens, pages) buffer)


# Every dtype name a flag accepts (--dtype, --score_dtype), and the one 'auto' is resolved from
DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
SCORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware, probed once per process. oneDNN must take bf16 matmuls
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) and, on x86, the CPU must have AVX512-BF16 or AMX: oneDNN also says
    yes on plain AVX512 CPUs, where it emulates bf16 in software and fp32 is as fast or faster. Elsewhere (ARM's
    BF16 extension) oneDNN's answer is the hardware's. No timing: the answer must not change from run to run, since
    it is part of mining's page-cache key."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "x86", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


# Bump when exact MaxSim's arithmetic changes (summation order, blocking, rounding): results keyed on score_identity
# are then recomputed once
SCORING_VERSION = 1


def score_identity(embedding: dict, scoring: torch.dtype, device, rerank: int = 0) -> dict:
    """What a score depends on: the embeddings' identity (ColIntern.embedding_identity), the dtype MaxSim rounds to
    and the one it multiplies in on `device` (matmul_dtype: bf16 on a CPU without native bf16 is multiplied in fp32),
    the scoring code's version, the rerank depth and the vectors' dimension. Every entry is always present."""
    return {
        "embedding": embedding,
        "score_dtype": dtype_name(scoring),
        "matmul_dtype": dtype_name(matmul_dtype(scoring, device)),
        "scoring_version": SCORING_VERSION,
        "rerank": rerank,
        "dim": embedding["dim"],
    }


def score_dtype(requested="auto", device="cpu") -> torch.dtype:
    """The dtype MaxSim scores in: embeddings are rounded to it block by block, and each block is multiplied in it
    where the hardware has it (see matmul_dtype); per-query sums are float32 either way.

    `requested`: a torch dtype or a name (fp32, bf16, fp16, ...) is taken as given; 'auto' (or None) is bf16 on a CPU
    with native bf16 (cpu_has_native_bf16) and on a GPU (fp16 on one without bf16), and fp32 on any other CPU, where
    bf16 would be no faster: the blocks would be upcast to fp32 anyway."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        return dtype_by_name(requested)
    if torch.device(device).type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return gpu_dtype() if torch.cuda.is_available() else torch.float32


def dtype_by_name(name: str) -> torch.dtype:
    """'bf16', 'float16', 'fp32', ... -> the torch dtype; an unknown name is a one-line error."""
    if name not in DTYPE_NAMES:
        raise UserValueError(f"unknown dtype {name!r}: use one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def gpu_dtype() -> torch.dtype:
    """What 'auto' is on a GPU: bf16, or fp16 on one without it."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16': how flags, logs and stats name a score dtype."""
    return {v: k for k, v in SCORE_DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def matmul_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The dtype scores are computed in for embeddings rounded to `dtype`: `dtype` itself, except bf16/fp16 on a
    CPU without native support (bf16: see cpu_has_native_bf16; torch's fallback matmul is far slower than fp32), where
    each block is upcast to fp32: the same rounded inputs, fp32 arithmetic, at the fp32 speed."""
    if torch.device(device).type != "cpu" or dtype == torch.float32:
        return dtype
    if dtype == torch.bfloat16:
        return dtype if cpu_has_native_bf16() else torch.float32
    if dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return dtype
    return torch.float32


def cpu_sim_block(compute: torch.dtype) -> int:
    """maxsim_tokens' default block on a CPU for blocks computed in `compute`."""
    return CPU_SIM_BLOCK if compute == torch.float32 else CPU_SIM_BLOCK_BF16


@contextlib.contextmanager
def scoring_threads(device):
    """Around a scoring loop on a CPU: yields the torch thread count (workers for maxsim_tokens) and runs the
    caller's own small ops (padding, sums, top-k merges) single-threaded meanwhile; split over threads, such ops
    wait on each other at every call, which on a shared machine cost more than the scoring. Elsewhere yields None."""
    if torch.device(device).type != "cpu":
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


_CPU_POOL = None  # maxsim_tokens' worker threads on a CPU, one per torch thread


def _cpu_pool(workers: int):
    global _CPU_POOL
    if _CPU_POOL is None or _CPU_POOL._max_workers != workers:
        from concurrent.futures import ThreadPoolExecutor

        if _CPU_POOL is not None:
            _CPU_POOL.shutdown(wait=False)
        _CPU_POOL = ThreadPoolExecutor(workers, thread_name_prefix="maxsim")
    return _CPU_POOL


@torch.no_grad()
def maxsim_tokens(
    query_tokens: torch.Tensor, pages: torch.Tensor, block_elements: int | None = None, workers: int | None = None
) -> torch.Tensor:
    """(T, D) query tokens x (Np, Lp, D) pages from pad_pages, both in the dtype to multiply in -> (T, Np) in that
    dtype: each query token's best similarity on each page. Tiled so that one similarity block holds at most
    `block_elements` values (default: cpu_sim_block on a CPU, GPU_SIM_BLOCK on a GPU).

    On a CPU, `workers` single-threaded worker threads (default: torch's thread count) each take the next block
    not yet taken until none is left, instead of splitting every small matmul across all threads: no barrier per
    block, so a core taken by another process slows only its own worker. Each worker multiplies into one buffer of
    its own, reused for every block: a fresh block-sized tensor per block is fresh memory from the allocator,
    thousands of page faults per scoring run (bench/bench_maxsim.py measures both; docs/benchmarks.md)."""
    t, d = query_tokens.shape
    np_, lp, _ = pages.shape
    budget = block_elements or (GPU_SIM_BLOCK if query_tokens.is_cuda else cpu_sim_block(query_tokens.dtype))
    # roughly square blocks of (query tokens) x (whole pages); everything at once when it fits
    group = np_ if t * np_ * lp <= budget else max(1, min(np_, math.isqrt(budget) // lp))
    rows = max(1, min(t, budget // (group * lp)))
    rows = -(-t // -(-t // rows)) if t else rows  # as many blocks of rows, of even size: no thin last block
    flat = pages.reshape(np_ * lp, d)
    best = query_tokens.new_empty((t, np_))
    blocks = [(p0, r0) for p0 in range(0, np_, group) for r0 in range(0, t, rows)]  # disjoint parts of `best`
    threads = torch.get_num_threads()
    workers = min(len(blocks), workers or threads) if query_tokens.device.type == "cpu" else 1
    taken, lock = iter(range(len(blocks))), threading.Lock()
    inference = torch.is_inference_mode_enabled()  # worker threads start in the default grad modes

    def work(pooled: bool):
        with torch.inference_mode(inference), torch.no_grad():
            if pooled:
                torch.set_num_threads(1)  # this worker thread's own BLAS threads; the caller's are restored below
            buffer = query_tokens.new_empty(rows * group * lp)
            while True:
                with lock:
                    i = next(taken, None)
                if i is None:
                    return
                p0, r0 = blocks[i]
                p1, r1 = min(np_, p0 + group), min(t, r0 + rows)
                sim = buffer[: (r1 - r0) * (p1 - p0) * lp].view(r1 - r0, (p1 - p0) * lp)
                torch.mm(query_tokens[r0:r1], flat[p0 * lp : p1 * lp].T, out=sim)
                best[r0:r1, p0:p1] = sim.view(r1 - r0, p1 - p0, lp).amax(dim=-1)

    if workers <= 1:
        work(pooled=False)
        return best
    try:
        list(_cpu_pool(workers).map(work, [True] * workers))
    finally:
        torch.set_num_threads(threads)
    return best


def _rounded(x: torch.Tensor, dtype: torch.dtype, compute: torch.dtype, device) -> torch.Tensor:
    """`x` on `device`, its values rounded to `dtype`, ready to be copied into a `compute` buffer. The rounding is
    a pass of its own only when the compute dtype differs (bf16 scored in fp32): otherwise the copy into the
    buffer rounds."""
    x = x.to(device)
    return x.to(dtype) if dtype != compute and x.dtype != dtype else x


def pack_queries(queries: Sequence[torch.Tensor], dtype, device, compute: torch.dtype | None = None) -> tuple:
    """Ragged queries -> (tokens (T, D) rounded to `dtype`, in `compute` (default `dtype`), owner (T,) query index
    of each token): no padding, so no wasted FLOPs."""
    compute = compute or dtype
    tokens = torch.cat([_rounded(q, dtype, compute, device).to(compute) for q in queries])
    lengths = torch.tensor([q.shape[0] for q in queries], device=device)
    return tokens, torch.repeat_interleave(torch.arange(len(queries), device=device), lengths)


def page_chunks(pages: Sequence[torch.Tensor], dtype, device, compute: torch.dtype | None = None, reuse: bool = False):
    """Yield (page indices, padded pages (n, Lp, D) rounded to `dtype`, in `compute` (default `dtype`)), pages
    sorted by length so padding stays small. Each page is converted as it is padded, one chunk at a time.

    `reuse`: pad every chunk into one buffer, overwritten by the next chunk, for a caller done with each chunk
    before it takes the next. A fresh tensor per chunk is memory touched for the first time, whose page faults
    cost as much again as the copy."""
    compute = compute or dtype
    order = sorted(range(len(pages)), key=lambda i: pages[i].shape[0])
    buffer = None
    start = 0
    while start < len(order):
        end = start + 1  # lengths ascend, so a chunk's padded size is (pages in it) x (its last page's length)
        while end < len(order) and (end + 1 - start) * pages[order[end]].shape[0] <= PAGE_CHUNK_TOKENS:
            end += 1
        idx = order[start:end]
        size = (end - start) * pages[order[end - 1]].shape[0] * pages[order[0]].shape[1]
        if reuse and (buffer is None or buffer.numel() < size):
            buffer = torch.empty(max(size, PAGE_CHUNK_TOKENS * pages[order[0]].shape[1]), dtype=compute, device=device)
        yield (
            torch.tensor(idx, device=device),
            pad_pages([_rounded(pages[i], dtype, compute, device) for i in idx], dtype=compute, buffer=buffer),
        )
        start = end


def sum_by_query(best: torch.Tensor, owner: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(T, n) per-token best similarities -> (n_queries, n) float32 MaxSim scores, each query's tokens summed in one
    fixed order on every device. On CUDA, index_add_ adds repeated indices with float atomics, in an order that
    varies from run to run (and so could flip near-ties in a top-k): there each query's tokens (a contiguous run of
    `owner`, as pack_queries lays them) go into a zero-padded dense (n_queries, longest, n) block, summed along its
    token axis. On a CPU index_add_ adds row after row, in index order, and is kept: a fresh dense block there is
    page faults."""
    if not adds_in_varying_order(best.device) or owner.numel() == 0:
        return best.new_zeros((n_queries, best.shape[1]), dtype=torch.float32).index_add_(0, owner, best.float())
    counts = torch.bincount(owner, minlength=n_queries)
    starts = torch.cumsum(counts, 0) - counts  # integers: exact
    slot = torch.arange(owner.numel(), device=owner.device) - starts[owner]
    dense = best.new_zeros((n_queries, int(counts.max()), best.shape[1]), dtype=torch.float32)
    dense[owner, slot] = best.float()
    return dense.sum(dim=1)


def adds_in_varying_order(device) -> bool:
    """Whether index_add_ on this device adds repeated indices in an order that varies by run (CUDA's atomics)."""
    return torch.device(device).type == "cuda"


def merge_topk(
    values: torch.Tensor, indices: torch.Tensor, new_values: torch.Tensor, new_indices: torch.Tensor, k: int
) -> tuple:
    """A running top-k per row, (n, k) values and indices, merged with (n, m) new ones -> the k best of both."""
    return top_k_by_index(torch.cat([values, new_values], dim=1), torch.cat([indices, new_indices], dim=1), k)


def top_k_by_index(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple:
    """(n, m) values and their page indices -> the k best per row, (n, k) each, best first; equal values in page
    index order (torch.topk leaves the order of ties unspecified), so the pick never depends on how pages or queries
    were grouped."""
    by_index = indices.argsort(dim=1, stable=True)
    v = values.gather(1, by_index)
    order = v.argsort(dim=1, descending=True, stable=True)[:, :k]
    return v.gather(1, order), indices.gather(1, by_index).gather(1, order)


def sync(device) -> None:
    """Wait for queued GPU work (before reading a clock); nothing on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# How far a bf16 score can be from the exact (float64) one, per query token, for unit vectors of dimension D
# (see bf16_score_bound): bf16 keeps 8 significand bits, so rounding to it has unit roundoff u = 2^-8. Each input
# carries a relative error <= u per element, so a rounded product q_i p_i is off by <= (2u + u^2)|q_i p_i| and the
# dot product by <= ~2u sum|q_i p_i| <= 2u |q| |p| = 2u (Cauchy-Schwarz, unit vectors). fp32 accumulation of D terms
# adds <= D 2^-24 sum|q_i p_i| <= D 2^-24; a native bf16 matmul writes bf16, one more rounding: <= u |s| <= u. A max
# over page tokens is 1-Lipschitz, so a token's best similarity is off by at most the worst similarity error; the
# float32 sum over Lq query tokens adds the Lq errors (and <= Lq^2 2^-24 of its own).
BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24


def score_error_bound(dtype: torch.dtype, query_tokens: int, dim: int) -> float:
    """Worst-case |score - exact score| of one query of `query_tokens` unit vectors of size `dim` scored in
    `dtype` (fp32 inputs taken as exact; the derivation is above)."""
    rounding = 3 * BF16_UNIT_ROUNDOFF if dtype == torch.bfloat16 else 0.0
    if dtype not in (torch.bfloat16, torch.float32):
        raise UserValueError(f"no bound derived for {dtype}")
    return query_tokens * (rounding + (dim + query_tokens) * FP32_UNIT_ROUNDOFF)


def maxsim_scores(
    queries: Sequence[torch.Tensor],
    pages: Sequence[torch.Tensor],
    device="cpu",
    dtype=torch.float32,
    max_sim_elements: int | None = None,
) -> torch.Tensor:
    """Exact MaxSim of ragged queries x ragged pages -> (Nq, Np) float32 on the CPU.

    Query tokens are packed (no padding), pages sorted by length and padded in chunks with their own first token,
    and each chunk scored in similarity blocks of at most `max_sim_elements` values (default: cache-sized on a CPU,
    large on a GPU). `dtype` is the score dtype (see score_dtype; 'auto' resolves there): what embeddings are
    rounded to before scoring; scores are summed in float32."""
    if len(queries) == 0 or len(pages) == 0:
        return torch.zeros(len(queries), len(pages))
    dtype = score_dtype(dtype, device)
    compute = matmul_dtype(dtype, device)
    scores = torch.empty(len(queries), len(pages))
    with scoring_threads(device) as workers:
        tokens, owner = pack_queries(queries, dtype, device, compute)  # (T, D), (T,)
        for idx, chunk in page_chunks(pages, dtype, device, compute, reuse=True):
            best = maxsim_tokens(tokens, chunk, max_sim_elements, workers)
            scores[:, idx.cpu()] = sum_by_query(best, owner, len(queries)).cpu()
    return scores


def maxsim_topk(
    queries: Sequence[torch.Tensor],
    pages: Sequence[torch.Tensor],
    k: int,
    device="cpu",
    dtype=torch.float32,
    max_sim_elements: int | None = None,
    on_scores=None,
    query_block_tokens: int = QUERY_BLOCK_TOKENS,
) -> tuple:
    """The k best pages per query by exact MaxSim, never holding the (Nq, Np) matrix: each block of queries keeps
    a running top-k while page chunks stream past. `dtype`: the score dtype, as in maxsim_scores.

    -> (scores (Nq, k) float32, page indices (Nq, k) int64), best first, on the CPU; k is capped at len(pages),
    and slots no page filled are (-inf, -1). `on_scores(q0, q1, page_idx, scores)`, if given, sees every
    (queries q0:q1) x (pages page_idx) float32 block before it enters the top-k and may set entries to -inf to
    exclude them (e.g. a query's positive), or count them."""
    k = min(k, len(pages))
    values = torch.full((len(queries), k), float("-inf"))
    indices = torch.full((len(queries), k), -1, dtype=torch.long)
    if len(queries) == 0 or k == 0:
        return values, indices
    blocks = query_blocks([q.shape[0] for q in queries], query_block_tokens)
    dtype = score_dtype(dtype, device)
    compute = matmul_dtype(dtype, device)
    with scoring_threads(device) as workers:
        chunks = page_chunks(pages, dtype, device, compute, reuse=len(blocks) == 1)
        if len(blocks) > 1:
            chunks = list(chunks)  # every block of queries meets every chunk: pad them once
        for q0, q1 in blocks:
            tokens, owner = pack_queries(queries[q0:q1], dtype, device, compute)
            best_v = torch.full((q1 - q0, k), float("-inf"), device=device)
            best_i = torch.full((q1 - q0, k), -1, dtype=torch.long, device=device)
            for idx, chunk in chunks:
                best = maxsim_tokens(tokens, chunk, max_sim_elements, workers)
                scores = sum_by_query(best, owner, q1 - q0)  # (nq, n)
                if on_scores is not None:
                    on_scores(q0, q1, idx, scores)
                best_v, best_i = merge_topk(best_v, best_i, scores, idx.expand(q1 - q0, -1), k)
            values[q0:q1], indices[q0:q1] = best_v.cpu(), best_i.cpu()
    indices[values == float("-inf")] = -1
    return values, indices


# The exact search's blocks of queries, which ranks split (colintern_launch runs the ranks)
def query_blocks(lengths: Sequence[int], query_block_tokens: int) -> list:
    """maxsim_topk's blocks of queries, [(q0, q1), ...]: greedy runs of about query_block_tokens tokens. A run of
    whole blocks sliced out of a list is blocked the same way again, which is what lets ranks split queries at
    block boundaries and multiply exactly the matrices one process would."""
    blocks, q0 = [], 0
    while q0 < len(lengths):
        q1, n_tokens = q0, 0
        while q1 < len(lengths) and (q1 == q0 or n_tokens + lengths[q1] <= query_block_tokens):
            n_tokens += lengths[q1]
            q1 += 1
        blocks.append((q0, q1))
        q0 = q1
    return blocks


# -----------------------------------------------------------------------------
# Pooling: fewer page vectors for a smaller index (eval.py and mine_hard_negatives.py --pool_factor)
#
# A page's L tokens are clustered hierarchically (Ward linkage on the unit token vectors themselves) into
# max(1, L // pool_factor) clusters, each replaced by its renormalised mean; queries are never pooled and scoring is
# the same exact MaxSim. colpali-engine's HierarchicalTokenPooler runs Ward on the rows of 1 - E E^T instead: an
# L-dimensional observation per token, O(L^3) per page for the distances, against O(L^2 D) here.


def page_clusters(page: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """(L, D) unit vectors -> (L,) int64 cluster of each token, 0..n_clusters-1 numbered by first token. The tree is
    cut after its first L - n_clusters merges (scipy sorts them by height, stably), so the count is exact even when
    heights tie, where fcluster's maxclust may return fewer; otherwise the same clusters."""
    import numpy as np
    from scipy.cluster.hierarchy import linkage

    n = len(page)
    merges = linkage(page.detach().cpu().double().numpy(), method="ward")[: n - n_clusters, :2].astype(np.int64)
    parent = np.arange(2 * n - 1)
    parent[merges[:, 0]] = parent[merges[:, 1]] = np.arange(n, n + len(merges))
    parent = parent[: n + len(merges)]
    while True:  # pointer jumping: every token to its cluster's root
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    _, first, inverse = np.unique(parent[:n], return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return torch.from_numpy(rank[inverse.reshape(-1)])


def pool_page(page: torch.Tensor, pool_factor: int) -> torch.Tensor:
    """(L, D) unit page vectors -> (max(1, L // pool_factor), D): each cluster's renormalised mean, clusters in the
    order of their first token, in the page's dtype and device. pool_factor 1 returns `page` itself."""
    if pool_factor < 1:
        raise UserValueError(f"pool_factor must be >= 1, got {pool_factor}")
    n_clusters = max(1, len(page) // pool_factor)
    if n_clusters >= len(page):
        return page
    label = page_clusters(page, n_clusters).to(page.device)
    sums = torch.zeros(n_clusters, page.shape[1], dtype=torch.float32, device=page.device)
    sums.index_add_(0, label, page.float())  # (K, D)
    return F.normalize(sums, dim=-1).to(page.dtype)


def pool_pages(pages: Sequence[torch.Tensor], pool_factor: int, workers: int | None = None) -> list:
    """pool_page over a list of pages, on `workers` threads (default: torch's thread count): the distance
    computation and the linkage run in numpy/scipy. Same result whatever the thread count."""
    if pool_factor == 1:
        return list(pages)
    workers = min(len(pages), workers or torch.get_num_threads())
    if workers <= 1:
        return [pool_page(p, pool_factor) for p in pages]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="pool") as ex:
        return list(ex.map(functools.partial(pool_page, pool_factor=pool_factor), pages))


def index_bytes(pages: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes the pages' vectors take held in `dtype` (default: their own)."""
    return sum(p.numel() * (dtype or p.dtype).itemsize for p in pages)
