"""The training loss: InfoNCE over MaxSim scores with bounded memory, Matryoshka prefixes, and gradient caching
(one contrastive batch over several micro-batches and every rank's pages)."""

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Training MaxSim: differentiable, in blocks, so memory does not grow with queries x pages x tokens


# Similarity values per block of the training maxsim, forward and backward alike. A block's transients are its
# similarity block and, in the backward, (queries, pages, Lq, D) gathers of at most the same size, so memory no longer
# grows with Nq x Np x Lq x Lp. GPU: 32M values (128 MiB in fp32) against the 6.3 GB of one dense similarity tensor
# at real shapes (32 queries x 50 tokens x 768 gathered 1,280-token pages: 2M values a page, so 16 pages a block and
# 48 blocks), big enough that each block's matmul outweighs its dozen kernel launches. CPU: 1M values, the top of the
# cache-sized range where maxsim_tokens' blocks run near the matmul peak; the per-block Python is negligible there.
CPU_TRAIN_SIM_BLOCK = 1 << 20
GPU_TRAIN_SIM_BLOCK = 1 << 25


def _index_dtype(length: int) -> torch.dtype:
    """The smallest integer dtype that holds token indices 0..length-1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if length - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _sim_blocks(nq: int, np_: int, per_pair: int, budget: int):
    """Yield (query slice, page slice) tiles of the (Nq, Np) grid, each of at most `budget` elements when a
    (query, page) pair costs `per_pair`: whole pages, and every query unless one page does not fit."""
    pages = max(1, min(np_, budget // max(1, nq * per_pair)))
    rows = max(1, min(nq, budget // max(1, pages * per_pair)))
    for p0 in range(0, np_, pages):
        for q0 in range(0, nq, rows):
            yield slice(q0, min(nq, q0 + rows)), slice(p0, min(np_, p0 + pages))


class _MaxSim(torch.autograd.Function):
    """maxsim, blockwise: saves the inputs, the masks and each query token's best page token, never similarities.

    Ties: a tied max sends all of its gradient to the one token torch.max picks (a subgradient; amax would split it
    evenly). Embeddings from continuous weights do not tie."""

    @staticmethod
    def forward(ctx, queries, pages, query_mask, page_mask):
        nq, lq, d = queries.shape
        np_, lp, _ = pages.shape
        budget = GPU_TRAIN_SIM_BLOCK if queries.is_cuda else CPU_TRAIN_SIM_BLOCK
        blocks = list(_sim_blocks(nq, np_, lq * max(lp, d), budget))  # max(Lp, D): the backward's gathers too
        best = queries.new_empty((nq, np_, lq))
        picked = torch.empty((nq, np_, lq), dtype=_index_dtype(lp), device=queries.device)
        for qs, ps in blocks:
            sim = torch.einsum("qid,pjd->qpij", queries[qs], pages[ps])  # (nq, n, Lq, Lp)
            if page_mask is not None:
                sim.masked_fill_(~page_mask[None, ps, None, :], float("-inf"))
            best[qs, ps], picked[qs, ps] = sim.max(dim=-1)
        if query_mask is not None:
            best.masked_fill_(~query_mask[:, None, :], 0.0)
        ctx.blocks = blocks
        ctx.save_for_backward(queries, pages, query_mask, page_mask, picked)
        return best.sum(dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores):
        queries, pages, query_mask, page_mask, picked = ctx.saved_tensors
        need_queries, need_pages = ctx.needs_input_grad[:2]
        nq, lq, d = queries.shape
        np_, lp, _ = pages.shape
        # d score[q, p] / d best[q, p, i]: none for a padded query token, none from a page without a real token
        # (its score is -inf whatever the inputs)
        weight = grad_scores.to(queries.dtype)[:, :, None].expand(nq, np_, lq)  # (Nq, Np, Lq)
        if query_mask is not None:
            weight = weight * query_mask[:, None, :]
        if page_mask is not None:
            weight = weight * page_mask.any(dim=1)[None, :, None]
        flat_pages = pages.reshape(np_ * lp, d)
        grad_queries = queries.new_zeros(queries.shape) if need_queries else None
        grad_pages = pages.new_zeros(pages.shape) if need_pages else None
        for qs, ps in ctx.blocks:
            w = weight[qs, ps]  # (nq, n, Lq)
            if need_queries:  # d score / d query token: the page token it picked
                offsets = torch.arange(ps.start, ps.stop, device=pages.device)[None, :, None] * lp
                rows = (picked[qs, ps].long() + offsets).flatten()  # each query token's best token, in flat_pages
                best_tokens = flat_pages.index_select(0, rows).view(*w.shape, d)  # (nq, n, Lq, D)
                grad_queries[qs] += torch.einsum("qpi,qpid->qid", w, best_tokens)
            if need_pages:  # d score / d page token: the sum of the query tokens that picked it, as a matmul over
                # the weighted one-hot choices (a block of the forward's size): many query tokens pick one page
                # token, and index_add_ would add them with float atomics on CUDA, in an order that varies by run
                chose = w.new_zeros((*w.shape, lp)).scatter_(-1, picked[qs, ps].long()[..., None], w[..., None])
                grad_pages[ps] += torch.einsum("qpij,qid->pjd", chose, queries[qs])
        return grad_queries, grad_pages, None, None


def maxsim(
    queries: torch.Tensor,
    pages: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    page_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable exact MaxSim of padded batches, for training.

    queries (Nq, Lq, D), pages (Np, Lp, D), masks True on real tokens -> scores (Nq, Np) in the inputs' dtype:
    for each query token its best real page token, summed over real query tokens. A padded page token never wins
    a max (it is -inf, not 0), a padded query token adds nothing. Memory: the similarities exist one block at a time
    (CPU/GPU_TRAIN_SIM_BLOCK values); backward keeps only the inputs and (Nq, Np, Lq) small-int argmax indices.
    """
    return _MaxSim.apply(queries, pages, query_mask, page_mask)


# -----------------------------------------------------------------------------
# Loss


def contrastive_loss(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    pages: torch.Tensor,
    page_mask: torch.Tensor,
    pos_index: torch.Tensor,
    temperature: float = 0.02,
    normalize_by_query_length: bool = True,
    dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """InfoNCE over MaxSim: query i's positive is pages[pos_index[i]]; every other page is a negative.

    `pages` is the candidate pool for all queries: the in-batch positives (from every rank, when gathered), then
    any hard negatives, all shared. Multi-GPU: gather pages from all ranks and pass pos_index = rank * B + arange(B).
    `dims` (Matryoshka): the plain sum of this loss over each vector prefix of those sizes, every prefix
    renormalised (a masked token's zero vector stays zero), so that each prefix is a retriever of its own.
    """
    if dims:
        return sum(
            contrastive_loss(
                matryoshka_prefix(queries, d),
                query_mask,
                matryoshka_prefix(pages, d),
                page_mask,
                pos_index,
                temperature,
                normalize_by_query_length,
            )
            for d in dims
        )
    scores = maxsim(queries, pages, query_mask, page_mask)  # (B, Npages)
    if normalize_by_query_length:
        scores = scores / query_mask.sum(dim=1, keepdim=True).clamp(min=1).to(scores.dtype)
    return F.cross_entropy(scores.float() / temperature, pos_index.to(scores.device))


def matryoshka_prefix(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., D) unit vectors (or zero ones) -> their first `dim` entries, renormalised (zero vectors stay zero)."""
    return emb if dim == emb.shape[-1] else F.normalize(emb[..., :dim], dim=-1)


# -----------------------------------------------------------------------------
# Gradient caching, and many processes (torchrun): the pages of every rank in one contrastive batch


def pad_left(emb: torch.Tensor, mask: torch.Tensor, length: int):
    """(N, L, D), (N, L) -> (N, length, D), (N, length): pad on the left, as the processor does, mask False."""
    extra = length - emb.shape[1]
    return F.pad(emb, (0, 0, extra, 0)), F.pad(mask, (extra, 0), value=False)


def gather_pages(pages: torch.Tensor, page_mask: torch.Tensor, n_queries: int, world: int):
    """Every rank's pages, positives of all ranks first (rank order), then all ranks' negatives. Padded to the
    longest rank first; torch.distributed.nn.all_gather keeps gradients flowing back to the rank that made them."""
    length = torch.tensor([pages.shape[1]], device=pages.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pages, page_mask = pad_left(pages, page_mask, int(length))
    gathered = torch.distributed.nn.all_gather(pages.contiguous())
    masks = [torch.empty_like(page_mask, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(masks, page_mask.to(torch.uint8))  # gloo has no bool all_gather
    masks = [m.bool() for m in masks]
    pages = torch.cat([g[:n_queries] for g in gathered] + [g[n_queries:] for g in gathered])
    page_mask = torch.cat([m[:n_queries] for m in masks] + [m[n_queries:] for m in masks])
    return pages, page_mask


class QueryPageEncoder(nn.Module):
    """One forward for a training batch, so DDP sees (and syncs the gradients of) both heads and LoRA."""

    def __init__(self, model: nn.Module):  # a ColIntern
        super().__init__()
        self.model = model

    def page_features(self, pages):
        """The pages' image features (ColIntern.image_features) for forward's page_features, to be computed once
        and reused; None where the vision tower trains (then they cannot be reused)."""
        return self.model.image_features(pages["pixel_values"]) if self.model.vision_frozen else None

    def forward(self, queries, pages, page_features=None):
        q, q_mask = self.model.forward_queries(queries)  # (B, Lq, D), (B, Lq)
        p, p_mask = self.model.forward_pages(pages, page_features)  # (B * (1 + num_negs), Lp, D), (.., Lp)
        return q, q_mask, p, p_mask


def contrastive_pool(encoded: list, rank: int, world: int):
    """The micro-batches' encodings -> one contrastive batch: this rank's queries, and as candidate pages every
    positive of every rank (rank order), then every rank's hard negatives, with each query's positive index.
    `encoded` holds (q, q_mask, pages, page_mask, n_queries) per micro-batch; tensors are padded on the left to
    common lengths (masked), so pages of differently padded micro-batches and ranks line up."""
    lq = max(e[0].shape[1] for e in encoded)
    lp = max(e[2].shape[1] for e in encoded)
    q, q_mask = (torch.cat(t) for t in zip(*(pad_left(e[0], e[1], lq) for e in encoded)))
    pages = [pad_left(e[2], e[3], lp) for e in encoded]
    n = sum(e[4] for e in encoded)
    positives = [(p[: e[4]], m[: e[4]]) for (p, m), e in zip(pages, encoded)]
    negatives = [(p[e[4] :], m[e[4] :]) for (p, m), e in zip(pages, encoded)]
    pages, page_mask = (torch.cat(t) for t in zip(*positives, *negatives))
    if world > 1:
        pages, page_mask = gather_pages(pages, page_mask, n, world)
    return q, q_mask, pages, page_mask, rank * n + torch.arange(n, device=q.device)


@dataclasses.dataclass(frozen=True)
class StepLoss:
    """What one optimizer step's loss is, fixed for a run: InfoNCE at `temperature`, summed over the Matryoshka
    prefixes `dims` when given; with gradient caching, `offload_features` keeps each micro-batch's image features in
    pinned CPU memory between its two passes."""

    temperature: float
    dims: list | None = None
    offload_features: bool = False


def batch_loss(encoder: nn.Module, batch: dict, settings: StepLoss, rank: int = 0, world: int = 1) -> torch.Tensor:
    """InfoNCE of this rank's queries against the pages of every rank (positives, then hard negatives)."""
    q, q_mask, pages, page_mask = encoder(batch["queries"], batch["pages"])
    q, q_mask, pages, page_mask, pos_index = contrastive_pool(
        [(q, q_mask, pages, page_mask, batch["n_queries"])], rank, world
    )
    return contrastive_loss(
        q, q_mask, pages, page_mask, pos_index, temperature=settings.temperature, dims=settings.dims
    )


def rng_state():
    """The CPU generator and every CUDA device's: under --device_map auto, LoRA layers on each GPU draw their dropout
    masks from that GPU's generator."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def grad_cache_step(
    encoder: nn.Module, micro_batches: list, settings: StepLoss, rank: int = 0, world: int = 1, scale=lambda loss: loss
) -> torch.Tensor:
    """One optimizer step's forward and backward over several micro-batches with gradient caching (Gao et al.
    2021), so that all their queries form ONE contrastive batch against all their pages, while activations exist
    for one micro-batch at a time:
      1. encode every micro-batch without a graph, keeping the embeddings, the RNG state before each, and the pages'
         image features (the frozen vision tower's output; in pinned CPU memory with `settings.offload_features`);
      2. the loss over the whole batch (pages gathered from every rank), backward to the embeddings only;
      3. re-encode each micro-batch with its graph from its kept image features (the vision tower runs once a step),
         the same RNG state (so LoRA dropout draws the same masks), and back-propagate its cached embedding
         gradients into LoRA and the heads. Under DDP only the last re-encode all-reduces (no_sync before it), once,
         over the accumulated gradients.
    -> the loss (detached). `scale` multiplies the loss before backward (fp16 loss scaling); `dims`: the
    Matryoshka prefixes the loss sums over."""
    module = encoder.module if isinstance(encoder, nn.parallel.DistributedDataParallel) else encoder
    states, cached, features = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(rng_state())
            f = module.page_features(batch["pages"])
            q, q_mask, p, p_mask = module(batch["queries"], batch["pages"], f)
            cached.append((q.requires_grad_(), q_mask, p.requires_grad_(), p_mask, batch["n_queries"]))
            features.append(to_pinned_host(f) if settings.offload_features and f is not None else f)
            del f
    pooled = contrastive_pool(cached, rank, world)
    loss = contrastive_loss(*pooled, temperature=settings.temperature, dims=settings.dims)
    scale(loss).backward()
    after = rng_state()
    for i, (batch, state, (q_cached, _, p_cached, _, _)) in enumerate(zip(micro_batches, states, cached)):
        set_rng_state(state)
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or world == 1 else encoder.no_sync():
            q, _, p, _ = encoder(batch["queries"], batch["pages"], features[i])
            torch.autograd.backward([q, p], [q_cached.grad, p_cached.grad])
        features[i] = None  # freed as soon as used
    set_rng_state(after)
    return loss.detach()


def to_pinned_host(t: torch.Tensor) -> torch.Tensor:
    """A GPU tensor copied to pinned CPU memory without a sync (the copy back, on the same stream, comes after it);
    a CPU tensor as it is."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def step_forward_backward(
    encoder: nn.Module, micro_batches: list, settings: StepLoss, rank: int = 0, world: int = 1, scale=lambda loss: loss
) -> torch.Tensor:
    """Forward and backward of one optimizer step: one plain pass for one micro-batch, gradient caching for more."""
    if len(micro_batches) > 1:
        return grad_cache_step(encoder, micro_batches, settings, rank, world, scale)
    loss = batch_loss(encoder, micro_batches[0], settings, rank, world)
    scale(loss).backward()
    return loss.detach()
