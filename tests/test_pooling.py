"""Token pooling (colintern_model's Pooling section): checked against hand-made pages and scipy's own fcluster."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import colintern_scoring as cs


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_pool_factor_1_is_the_identity():
    page = unit(37, 16)
    assert cs.pool_page(page, 1) is page
    pages = [page, unit(5, 16, seed=1)]
    assert all(a is b for a, b in zip(cs.pool_pages(pages, 1), pages))
    with pytest.raises(ValueError, match="pool_factor must be >= 1"):
        cs.pool_page(page, 0)


@pytest.mark.parametrize("length", [1, 2, 5, 7, 64, 301])
@pytest.mark.parametrize("factor", [2, 3, 4, 6])
def test_cluster_counts_and_unit_norm(length, factor):
    page = unit(length, 32, seed=length)
    pooled = cs.pool_page(page, factor)
    assert pooled.shape == (max(1, length // factor), 32)
    assert pooled.dtype == page.dtype
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(len(pooled)))


def test_ties_still_give_the_exact_count():
    # 12 tokens, 3 distinct vectors x 4 copies: every merge within a group is at height 0 (fcluster's maxclust
    # would stop at 3 clusters for any requested count >= 3)
    base = unit(3, 8)
    page = base.repeat_interleave(4, dim=0)
    pooled = cs.pool_page(page, 2)  # 6 clusters
    assert pooled.shape == (6, 8)
    assert cs.page_clusters(page, 3).tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_planted_groups_pool_to_their_means():
    """L // F well-separated groups (tight noise around far-apart centres, tokens shuffled) pool to the groups'
    renormalised means, clusters numbered by their first token."""
    factor, groups, dim = 3, 20, 64
    centres = unit(groups, dim, seed=1)
    member = torch.randperm(groups * factor, generator=torch.Generator().manual_seed(2)) % groups
    page = F.normalize(centres[member] + 0.02 * unit(len(member), dim, seed=3), dim=-1)
    pooled = cs.pool_page(page, factor)
    first_seen = list(dict.fromkeys(member.tolist()))  # groups in order of their first token
    expected = torch.stack([F.normalize(page[member == g].mean(0), dim=0) for g in first_seen])
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)


def test_same_clusters_as_fcluster_and_deterministic():
    from scipy.cluster.hierarchy import fcluster, linkage

    page = unit(200, 32, seed=5)
    labels = cs.page_clusters(page, 50).numpy()
    reference = fcluster(linkage(page.double().numpy(), method="ward"), t=50, criterion="maxclust")
    # the same partition (labels differ only in numbering)
    pairs = set(zip(labels.tolist(), reference.tolist()))
    assert len(pairs) == len(set(labels.tolist())) == len(set(reference.tolist())) == 50
    first = np.unique(labels, return_index=True)[1]  # first token of cluster 0, 1, ...: increasing
    assert labels[0] == 0 and np.all(np.diff(first) > 0)
    pages = [unit(n, 32, seed=n) for n in (50, 120, 7, 300)]
    serial = cs.pool_pages(pages, 3, workers=1)
    threaded = cs.pool_pages(pages, 3, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded))
    assert torch.equal(cs.pool_page(pages[1], 3), serial[1])


def test_half_precision_pages_pool_in_their_dtype():
    page = unit(40, 16).half()
    pooled = cs.pool_page(page, 4)
    assert pooled.dtype == torch.float16 and pooled.shape == (10, 16)
    assert cs.index_bytes([pooled]) == 10 * 16 * 2
    assert cs.index_bytes([pooled], torch.float32) == 10 * 16 * 4


def test_bench_pooling_runs_on_a_small_planted_set(capsys):
    from bench import bench_pooling

    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    assert bench_pooling.ndcg_at_5(scores, {0: {2}, 1: {0}}) == [1 / np.log2(3), 1.0]
    bench_pooling.main(
        bench_pooling.parse_args(
            ["--planted_queries", "6", "--page_tokens", "40", "60", "--factors", "1", "2", "--rerank", "2"]
        )
    )
    out = capsys.readouterr().out
    assert "planted embeddings: 6 queries" in out and "ColIntern        2" in out
    if bench_pooling.colpali_available():  # the bench-only peer (bench/requirements.txt); CI does not install it
        assert "colpali-engine   2" in out and "ColIntern pools" in out and "as fast as colpali-engine per page" in out
    else:
        assert "colpali-engine is not installed: its pooler is skipped" in out and "colpali-engine   2" not in out
