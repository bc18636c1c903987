"""mine_hard_negatives.py through its CLI entry (main(parse_args([...]))) on the tiny model and rendered keyword pages,
checked against a brute-force ranking computed here from the model's own encoders."""

import json
import math
import os
import shutil

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import query

import colintern_scoring as cs
import mine_hard_negatives as mine
from colintern_data import pseudo_path
from colintern_model import ColIntern, LoraSettings, save_checkpoint
from colintern_scoring import maxsim_scores, maxsim_topk
from make_synthetic_data import WORDS as ALL_WORDS
from make_synthetic_data import render_keyword_page

WORDS = ALL_WORDS[:22]  # one hub row (query + page) each
COPIES = {7: 2, 12: 2}  # hub rows whose page is byte-identical to row 2's page (colpali_train_set repeats pages)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_mine(*flags):
    return mine.main(mine.parse_args([str(f) for f in flags]))


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    """An untrained checkpoint (seeded heads, LoRA): its rankings are arbitrary but deterministic, which is all the
    comparison with brute force needs."""
    torch.manual_seed(0)
    model, _ = ColIntern.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=4), max_tiles=1)
    path = str(tmp_path_factory.mktemp("ckpt") / "colintern_heads_epoch1.pt")
    save_checkpoint(path, model, epoch=1)
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub-layout dataset folder: one query + page per row; rows 7 and 12 repeat row 2's page byte for byte."""
    images = [render_keyword_page(w, variant=i) for i, w in enumerate(WORDS)]
    for row, source in COPIES.items():
        images[row] = images[source].copy()
    ds = datasets.Dataset.from_dict({"query": [query(w) for w in WORDS], "image": images})
    ds = ds.cast_column("image", datasets.Image())
    folder = tmp_path_factory.mktemp("hub")
    os.makedirs(folder / "data")
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return {"dir": str(folder), "images": images}


@pytest.fixture(scope="module")
def brute(ckpt, hub):
    """Scores of every query with every row's page, computed here: the model's encoders, pages rounded to fp16 as
    the cache stores them, MaxSim as a naive per-pair loop."""
    model, processor, _ = ColIntern.from_checkpoint(ckpt)
    q = model.encode_queries(processor, [query(w) for w in WORDS])
    p = [x.half().float() for x in model.encode_pages(processor, hub["images"])]
    scores = torch.tensor([[float((a @ b.T).amax(dim=1).sum()) for b in p] for a in q])  # (rows, rows)
    return scores


def content_row(row):
    """The first row holding the same page content as `row`."""
    return COPIES.get(row, row)


def row_of(ref):
    return int(ref.rsplit("doc_", 1)[1].split(".")[0])


def expected_negatives(scores, k, margin):
    """Brute-force mining: per query, every distinct page except its positive's content, those above
    margin x positive dropped, the k best of the rest -> (rows of negatives, their scores), plus ranks and drops."""
    distinct = [r for r in range(len(WORDS)) if r not in COPIES]
    out = []
    for i in range(len(WORDS)):
        pos = scores[i, i]
        cands = [j for j in distinct if j != content_row(i)]
        kept = [j for j in cands if not scores[i, j] > margin * pos]
        best = sorted(kept, key=lambda j: -scores[i, j])[:k]
        out.append(
            {"negs": best, "rank": 1 + sum(bool(scores[i, j] > pos) for j in cands), "dropped": len(cands) - len(kept)}
        )
    return out


def mine_hub(ckpt, hub, out, *extra):
    # fp32 scores pinned: the comparisons with brute force must not change with the CPU's bf16 (auto's pick)
    return run_mine(
        "--ckpt",
        ckpt,
        "--train_hub",
        hub["dir"],
        "--split",
        "train",
        "--out",
        out,
        "--shard_pages",
        5,
        "--num_workers",
        0,
        "--doc_batch",
        4,
        "--score_dtype",
        "fp32",
        *extra,
    )


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_against_brute_force(rows, expected, scores, hub):
    assert [r["query"] for r in rows] == [query(w) for w in WORDS]
    for i, (row, exp) in enumerate(zip(rows, expected)):
        assert row["pos"] == pseudo_path(hub["dir"], "train", i)
        assert all(ref.startswith(hub["dir"] + "/train/doc_") for ref in row["negs"])
        got = [row_of(ref) for ref in row["negs"]]
        assert len(got) == len(exp["negs"])
        # the same pages in the same order, up to swaps of (numerically) tied scores
        assert torch.allclose(scores[i, got], scores[i, exp["negs"]], atol=1e-5), (i, got, exp["negs"])
        # never the positive, never a page with the positive's content, never a duplicate's own row name
        assert content_row(i) not in got and not set(got) & set(COPIES)


def test_exact_mining_equals_brute_force_then_reuses_cached_shards(ckpt, hub, brute, tmp_path, capsys):
    k = 4
    stats = mine_hub(ckpt, hub, tmp_path / "all.jsonl", "--k", k, "--margin", "inf")
    expected = expected_negatives(brute, k, math.inf)
    check_against_brute_force(read_rows(tmp_path / "all.jsonl"), expected, brute, hub)
    assert all(len(e["negs"]) == k for e in expected)
    assert stats["distinct_pages"] == len(WORDS) - len(COPIES) and stats["duplicates_removed"] == len(COPIES)
    assert stats["margin_dropped"]["candidates"] == 0
    ranks = torch.tensor([e["rank"] for e in expected], dtype=torch.float64)
    assert stats["positive_rank"]["mrr"] == pytest.approx(float((1 / ranks).mean()))
    for n in (1, 5, 10):
        assert stats["positive_rank"][f"recall@{n}"] == pytest.approx(float((ranks <= n).double().mean()))
    assert stats["cache"] == {"dir": stats["cache"]["dir"], "shards": 4, "reused": 0, "encoded": 4}
    assert set(stats["timings_s"]) >= {"encode_pages", "encode_queries", "search"}
    assert json.load(open(tmp_path / "all.stats.json")) == stats

    # the margin filter, at a margin that drops about half of the candidates (from the brute-force scores)
    distinct = [j for j in range(len(WORDS)) if j not in COPIES]
    ratios = torch.tensor(
        [float(brute[i, j] / brute[i, i]) for i in range(len(WORDS)) for j in distinct if j != content_row(i)]
    )
    ratios = ratios.sort().values
    middle = len(ratios) // 2
    margin = float(ratios[middle] + ratios[middle + 1]) / 2  # between two ratios: no candidate sits on the edge
    capsys.readouterr()
    stats = mine_hub(ckpt, hub, tmp_path / "margin.jsonl", "--k", k, "--margin", margin)
    expected = expected_negatives(brute, k, margin)
    short = sum(len(e["negs"]) < k for e in expected)
    assert f"{short} of {len(WORDS)} queries got fewer than --k {k} negatives" in capsys.readouterr().out
    rows = read_rows(tmp_path / "margin.jsonl")
    check_against_brute_force(rows, expected, brute, hub)
    assert stats["margin_dropped"]["candidates"] == sum(e["dropped"] for e in expected) > 0
    assert stats["negatives_per_query"]["queries_short_of_k"] == sum(len(e["negs"]) < k for e in expected)
    for i, row in enumerate(rows):
        assert all(brute[i, row_of(ref)] <= margin * brute[i, i] for ref in row["negs"])
    # the same checkpoint and pages: every shard comes from the cache, nothing is encoded again
    assert stats["cache"]["reused"] == 4 and stats["cache"]["encoded"] == 0


def planted(n_queries=60, n_pages=300, q_len=12, p_len=40, dim=32, seed=0):
    """Pages of random unit vectors; query i's relevant pages i*5 .. i*5+4 hold noisy copies of 12, 10, 8, 6, 4 of
    its tokens, so its top-5 is well separated from the near-tied rest."""
    g = torch.Generator().manual_seed(seed)
    pages = [F.normalize(torch.randn(p_len, dim, generator=g), dim=-1) for _ in range(n_pages)]
    queries = []
    for i in range(n_queries):
        q = F.normalize(torch.randn(q_len, dim, generator=g), dim=-1)
        for rank, copies in enumerate((12, 10, 8, 6, 4)):
            page = pages[(i * 5 + rank) % n_pages]
            page[:copies] = F.normalize(q[:copies] + 0.3 * torch.randn(copies, dim, generator=g) / dim**0.5, dim=-1)
        queries.append(q)
    return queries, pages


def test_scoring_kernels_equal_a_naive_loop_with_pooled_blocks_and_filters(monkeypatch):
    """maxsim_scores / maxsim_topk (the mining kernel) and score_pairs against the plain definition, with tiny blocks
    spread over 2 worker threads, several page chunks and query blocks, inside inference mode (as the encoders leave
    it), negative similarities included."""
    monkeypatch.setattr(cs, "PAGE_CHUNK_TOKENS", 80)
    g = torch.Generator().manual_seed(3)
    queries = [
        F.normalize(torch.randn(int(n), 16, generator=g), dim=-1) for n in torch.randint(1, 9, (23,), generator=g)
    ]
    pages = [
        F.normalize(torch.randn(int(n), 16, generator=g), dim=-1) for n in torch.randint(1, 40, (31,), generator=g)
    ]
    pages.append(-queries[0][:1].repeat(3, 1))  # every similarity with query 0 negative
    naive = torch.tensor([[float((q @ p.T).amax(dim=1).sum()) for p in pages] for q in queries])
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            assert torch.allclose(maxsim_scores(queries, pages, max_sim_elements=64), naive, atol=1e-5)
            excluded = torch.arange(len(queries)) % len(pages)  # query i may not get page i

            def on_scores(q0, q1, idx, scores):
                scores.masked_fill_(idx[None, :] == excluded[q0:q1, None], float("-inf"))

            values, indices = maxsim_topk(
                queries, pages, 5, max_sim_elements=64, on_scores=on_scores, query_block_tokens=10
            )
            pairs = (
                torch.arange(len(queries)).repeat_interleave(len(pages)),
                torch.arange(len(pages)).repeat(len(queries)),
            )
            by_pairs = mine.score_pairs(queries, pages, pairs, "cpu", torch.float32).view(len(queries), len(pages))
    finally:
        torch.set_num_threads(1)
    assert torch.allclose(by_pairs, naive, atol=1e-5)
    masked = naive.clone()
    masked[torch.arange(len(queries)), excluded] = float("-inf")
    expected = masked.topk(5, dim=1)
    assert torch.allclose(values, expected.values, atol=1e-5) and (indices == expected.indices).all()
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat"])
def test_faiss_candidates_recall_against_exact_on_planted_embeddings(spec):
    queries, pages = planted()
    k, n_candidates = 5, 20
    exact = maxsim_scores(queries, pages)
    exact_top = exact.topk(k, dim=1).indices
    index, token_page, used = mine.build_token_index(lambda: iter([(0, pages)]), spec, nprobe=4)
    assert used == spec and index.ntotal == sum(len(p) for p in pages)
    cands = mine.faiss_candidates(queries, index, token_page, len(pages), n_candidates, token_hits=16)
    assert cands.shape == (len(queries), n_candidates)
    # the FAISS path's final ranking: exact MaxSim of the candidates only
    rescored = torch.where(cands >= 0, exact.gather(1, cands.clamp(min=0)), torch.tensor(float("-inf")))
    faiss_top = cands.gather(1, rescored.topk(k, dim=1).indices)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact_top, faiss_top)) / exact_top.numel()
    assert recall >= 0.95, recall


def test_faiss_goes_on_this_ranks_gpu_after_torch_hands_back_its_cache(monkeypatch, capsys):
    """No GPU here: a GPU FAISS is faked (its GPU calls recorded, the index kept on the CPU). --device cuda:3 puts the
    index on GPU 3, this rank's own, not on GPU 0, after torch.cuda.empty_cache; nprobe goes through the GPU
    parameter space. --device cpu, or a FAISS without GPU support, keeps it on the CPU, the latter saying why."""
    import faiss

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(
        faiss, "index_cpu_to_gpu", lambda res, gpu, index: calls.append(("to_gpu", res, gpu)) or index, raising=False
    )

    class GpuParameterSpace:
        def set_index_parameter(self, index, name, value):
            calls.append((name, value))

    monkeypatch.setattr(faiss, "GpuParameterSpace", GpuParameterSpace, raising=False)
    assert mine.faiss_device("cpu") is None and calls == []
    assert mine.faiss_device("cuda:3") == 3 and calls == ["empty_cache"]
    _, pages = planted()
    index, _, spec = mine.build_token_index(lambda: iter([(0, pages)]), "IVF16,Flat", nprobe=4, gpu=3)
    assert spec == "IVF16,Flat" and calls[1:] == [("to_gpu", "resources", 3), ("nprobe", 4)]
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert mine.faiss_device("cuda:3") is None
    assert "FAISS runs on the CPU: this faiss" in capsys.readouterr().out and calls[3:] == []


def test_faiss_cli_agrees_with_exact(ckpt, hub, brute, tmp_path):
    k = 3
    stats = mine_hub(
        ckpt,
        hub,
        tmp_path / "faiss.jsonl",
        "--k",
        k,
        "--margin",
        "inf",
        "--search",
        "faiss",
        "--candidates",
        10,
        "--token_hits",
        32,
    )
    assert stats["faiss_index"] == "Flat" and stats["search"] == "faiss" and stats["faiss_device"] == "cpu"
    rows = read_rows(tmp_path / "faiss.jsonl")
    expected = expected_negatives(brute, k, math.inf)
    hits = sum(len(set(map(row_of, row["negs"])) & set(e["negs"])) for row, e in zip(rows, expected))
    assert hits / (k * len(rows)) >= 0.95
    for i, row in enumerate(rows):
        assert all(content_row(row_of(ref)) != content_row(i) for ref in row["negs"])


def save_png(path, image):
    image.save(path, format="PNG")
    return path


def test_jsonl_input_resume_after_undecodable_page_and_output_trains(ckpt, tiny_model_dir, tmp_path):
    """Pages as files (one a byte copy of another), a page that cannot be decoded in the last shard: the error names
    it and the finished shards are reused once it is fixed; the output keeps the input's paths and trains."""
    root = tmp_path / "root"
    os.makedirs(root / "pages")
    names = [f"pages/{w}.png" for w in WORDS[:10]]
    for i, (w, name) in enumerate(zip(WORDS, names)):
        save_png(root / name, render_keyword_page(w, variant=i))
    with open(root / names[0], "rb") as f:
        (root / "pages" / "apple_copy.png").write_bytes(f.read())
    (root / "pages" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = [{"query": query(w), "pos": name, "negs": []} for w, name in zip(WORDS, names)]
    rows[1]["negs"] = ["pages/apple_copy.png"]  # the same content as row 0's positive
    rows[9]["negs"] = ["pages/broken.png"]  # the last distinct page: in the last shard
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [
        "--ckpt",
        ckpt,
        "--train_jsonl",
        jsonl,
        "--root",
        root,
        "--out_jsonl",
        tmp_path / "mined.jsonl",
        "--k",
        3,
        "--margin",
        "inf",
        "--shard_pages",
        3,
        "--num_workers",
        0,
        "--cache_dir",
        tmp_path / "cache",
    ]
    with pytest.raises(ValueError, match="pages/broken.png.*cannot be decoded"):
        run_mine(*flags)
    folder = os.path.join(tmp_path / "cache", os.listdir(tmp_path / "cache")[0])
    assert sorted(f for f in os.listdir(folder) if f.startswith("shard_")) == [f"shard_{s:05d}.pt" for s in range(3)]
    assert not os.path.exists(tmp_path / "mined.jsonl")

    save_png(root / "pages" / "broken.png", render_keyword_page("mended"))
    stats = run_mine(*flags)
    # 10 positives + broken.png; apple_copy.png is apple.png: 11 distinct pages in 4 shards, 3 of them reused
    assert stats["distinct_pages"] == 11 and stats["duplicates_removed"] == 1
    assert stats["cache"]["reused"] == 3 and stats["cache"]["encoded"] == 1
    mined = read_rows(tmp_path / "mined.jsonl")
    assert [r["pos"] for r in mined] == names
    for row in mined:
        assert len(row["negs"]) == 3 and row["pos"] not in row["negs"]
        assert all(ref.startswith("pages/") and os.path.isfile(root / ref) for ref in row["negs"])
    assert "pages/apple_copy.png" not in {ref for row in mined for ref in row["negs"]}  # named by its first sight
    assert "pages/apple.png" not in mined[0]["negs"]

    import train

    out = tmp_path / "train"
    train.main(
        train.parse_args(
            [
                str(f)
                for f in [
                    "--model_id",
                    tiny_model_dir,
                    "--resume_ckpt",
                    ckpt,
                    "--train_jsonl",
                    tmp_path / "mined.jsonl",
                    "--root",
                    root,
                    "--out_dir",
                    out,
                    "--num_negs",
                    2,
                    "--batch_size",
                    4,
                    "--max_steps",
                    2,
                    "--optimizer",
                    "adamw",
                    "--num_workers",
                    0,
                    "--save_every",
                    0,
                    "--warmup_steps",
                    1,
                ]
            ]
        )
    )
    with open(out / "training_loss.txt") as f:
        losses = [float(line.split()[2]) for line in f if not line.startswith("#")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_bad_input_names_the_culprit(ckpt, hub, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "pos": "a.png"}) + "\n" + json.dumps({"query": "q2"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: 'pos' is missing"):
        run_mine("--ckpt", ckpt, "--train_jsonl", bad, "--out_jsonl", tmp_path / "o.jsonl")

    empty = tmp_path / "empty"
    os.makedirs(empty / "data")
    ds = datasets.Dataset.from_dict(
        {"query": [], "image": []},
        features=datasets.Features({"query": datasets.Value("string"), "image": datasets.Image()}),
    )
    ds.to_parquet(str(empty / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="empty"):
        run_mine("--ckpt", ckpt, "--hub_name", empty, "--out_jsonl", tmp_path / "o.jsonl")

    other = torch.load(ckpt, weights_only=True)
    other["meta"]["format"]["version"] = 99
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt uses query/page format v99"):
        run_mine(
            "--ckpt",
            tmp_path / "other.pt",
            "--hub_name",
            hub["dir"],
            "--out_jsonl",
            tmp_path / "o.jsonl",
            "--cache_dir",
            tmp_path / "cache",
        )
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        mine.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = (
        "model_id ckpt train_hub split out k doc_batch query_batch train_jsonl root search candidates "
        "margin max_tiles cache_dir device dtype score_dtype shard_pages token_hits faiss_index nprobe num_workers "
        "seed"
    )
    for flag in flags.split():
        assert f"--{flag} " in text or f"--{flag}\n" in text, flag
    actions = mine.build_parser()._actions
    assert {a.dest for a in actions} >= set(flags.split())
    assert all(a.help and len(a.help) > 15 for a in actions), [a.dest for a in actions if not a.help]


@pytest.mark.parametrize(
    "native, flag, used, matmul",
    [
        (False, "auto", torch.float32, torch.float32),
        (True, "auto", torch.bfloat16, torch.bfloat16),
        (False, "bf16", torch.bfloat16, torch.float32),  # forced where bf16 is not native: rounded, multiplied in fp32
        (True, "fp32", torch.float32, torch.float32),  # forced fp32 where it is
    ],
)
def test_score_dtype_is_picked_printed_recorded_used_and_keys_the_cache(
    ckpt, hub, brute, tmp_path, monkeypatch, capsys, native, flag, used, matmul
):
    """--score_dtype against what the CPU probe says (forced both ways, so any CPU runs every case): the dtype picked
    is printed, kept in the stats, and the one the search multiplies in; the page cache is keyed by the embeddings'
    identity alone."""
    monkeypatch.setattr(cs, "cpu_has_native_bf16", lambda: native)
    seen = set()
    real = cs.maxsim_tokens

    def spy(tokens, pages, *args, **kwargs):
        seen.add((tokens.dtype, pages.dtype, bool((tokens.float() == tokens.bfloat16().float()).all())))
        return real(tokens, pages, *args, **kwargs)

    monkeypatch.setattr(cs, "maxsim_tokens", spy)
    monkeypatch.setattr(mine, "maxsim_tokens", spy)
    out = tmp_path / "mined.jsonl"
    stats = run_mine(
        "--ckpt",
        ckpt,
        "--hub_name",
        hub["dir"],
        "--out_jsonl",
        out,
        "--shard_pages",
        5,
        "--num_workers",
        0,
        "--k",
        3,
        "--margin",
        "inf",
        "--score_dtype",
        flag,
        "--cache_dir",
        tmp_path / "cache",
    )
    name = cs.dtype_name(used)
    assert (
        f"score dtype {name} (--score_dtype {flag}; multiplied in {cs.dtype_name(matmul)} on cpu)"
        in capsys.readouterr().out
    )
    assert stats["score_dtype"] == {"requested": flag, "used": str(used), "matmul": str(matmul)}
    assert json.load(open(mine.stats_path(str(out))))["score_dtype"]["used"] == str(used)
    assert {(t, p) for t, p, _ in seen} == {(matmul, matmul)}
    assert all(rounded for _, _, rounded in seen) == (used == torch.bfloat16)
    # the page cache holds embeddings, whatever they are scored in: keyed by the model's embedding identity
    manifest = json.load(open(os.path.join(stats["cache"]["dir"], "manifest.json")))
    model = ColIntern.from_checkpoint(ckpt)[0]
    assert manifest["embedding"] == json.loads(json.dumps(model.embedding_identity()))
    args = mine.parse_args(
        [
            str(f)
            for f in (
                "--ckpt",
                ckpt,
                "--hub_name",
                hub["dir"],
                "--out_jsonl",
                out,
                "--shard_pages",
                5,
                "--cache_dir",
                tmp_path / "cache",
            )
        ]
    )
    data = mine.hub_input(hub["dir"], "train")
    assert mine.cache_folder(args, model, data)[0] == stats["cache"]["dir"]
    args.pool_factor = 2  # one ingredient of the identity: each one's effect is test_colintern_model's
    assert mine.cache_folder(args, model, data)[0] != stats["cache"]["dir"]
    # the negatives are the brute-force ones (fp32 scores; bf16 may swap near-ties, so compare by score)
    expected = expected_negatives(brute, 3, math.inf)
    tol = 1e-5 if used == torch.float32 else cs.score_error_bound(torch.bfloat16, 64, 128)  # queries: < 64 tokens
    for i, row in enumerate(read_rows(out)):
        got = [row_of(ref) for ref in row["negs"]]
        assert torch.allclose(brute[i, got], brute[i, expected[i]["negs"]], atol=2 * tol), (i, got)


def test_mining_on_a_4bit_checkpoint(tiny_model_dir, ckpt, hub, tmp_path, capsys):
    """A checkpoint trained on a 4-bit backbone mines on one (its own quantisation, or the same one asked for: one
    cache), the stats record it, and its page cache is not the unquantised run's."""
    torch.manual_seed(0)
    model, _ = ColIntern.from_pretrained(tiny_model_dir, lora=LoraSettings(r=4, alpha=4), max_tiles=1, quantize="4bit")
    q4 = str(tmp_path / "q4.pt")
    save_checkpoint(q4, model, epoch=1)
    stats = mine_hub(q4, hub, tmp_path / "q4.jsonl", "--k", 2)
    assert stats["quantize"] == "4bit" and stats["dtype"] == "torch.bfloat16"
    assert stats["cache"]["encoded"] == 4 and len(read_rows(tmp_path / "q4.jsonl")) == len(WORDS)
    assert "was trained on" not in capsys.readouterr().out
    again = mine_hub(q4, hub, tmp_path / "again.jsonl", "--k", 2, "--quantize", "4bit")
    assert again["cache"] == dict(stats["cache"], reused=4, encoded=0)
    plain = mine_hub(q4, hub, tmp_path / "plain.jsonl", "--k", 2, "--quantize", "none", "--dtype", "bf16")
    assert "trained on a --quantize 4bit backbone and is loaded on a --quantize none one" in capsys.readouterr().out
    assert plain["quantize"] == "none" and plain["cache"]["dir"] != stats["cache"]["dir"]
    assert plain["cache"]["encoded"] == 4


def test_a_backbone_rebuilt_in_place_is_not_served_from_the_cache(ckpt, hub, tiny_model_dir, tmp_path):
    """The backbone folder rebuilt with other weights under the same path: the page cache (keyed by the backbone's
    content, not its path) is missed, every shard is encoded again, and the JSONL is what a fresh cache gives. Before
    the embedding identity, mining reused the old shards and wrote the old model's negatives."""
    import make_tiny_model

    backbone, cache = tmp_path / "backbone", tmp_path / "cache"
    shutil.copytree(tiny_model_dir, backbone)
    first = mine_hub(ckpt, hub, tmp_path / "first.jsonl", "--model_id", backbone, "--cache_dir", cache)
    other, processor = make_tiny_model.build("tiny", tile=224, seed=1)
    other.save_pretrained(backbone)
    processor.save_pretrained(backbone)
    again = mine_hub(ckpt, hub, tmp_path / "again.jsonl", "--model_id", backbone, "--cache_dir", cache)
    fresh = mine_hub(ckpt, hub, tmp_path / "fresh.jsonl", "--model_id", backbone, "--cache_dir", tmp_path / "new")
    assert first["cache"]["encoded"] == again["cache"]["encoded"] == 4 and again["cache"]["reused"] == 0
    assert (
        (tmp_path / "again.jsonl").read_bytes()
        == (tmp_path / "fresh.jsonl").read_bytes()
        != (tmp_path / "first.jsonl").read_bytes()
    )
    assert fresh["cache"]["encoded"] == 4


def test_pooled_mining_equals_brute_force_on_pooled_pages_and_keys_the_cache(ckpt, hub, tmp_path):
    """--pool_factor 3: shards hold the pooled pages (pooled from the fp16-rounded embeddings the cache stores
    unpooled), the search is exact MaxSim on them, the stats record the index, and the cache is a folder of its own
    (the unpooled key is unchanged: no pool_factor entry)."""
    model, processor, _ = ColIntern.from_checkpoint(ckpt)
    q = model.encode_queries(processor, [query(w) for w in WORDS])
    full = [x.half().float() for x in model.encode_pages(processor, hub["images"])]
    pooled = [cs.pool_page(x, 3).half().float() for x in full]
    scores = torch.tensor([[float((a @ b.T).amax(dim=1).sum()) for b in pooled] for a in q])
    out = tmp_path / "mined.jsonl"
    cache = tmp_path / "cache"
    stats = mine_hub(ckpt, hub, out, "--k", 3, "--pool_factor", 3, "--cache_dir", cache)
    check_against_brute_force(read_rows(out), expected_negatives(scores, 3, 0.95), scores, hub)
    distinct = [r for r in range(len(WORDS)) if r not in COPIES]
    vectors = sum(len(pooled[r]) for r in distinct)
    assert vectors < sum(len(full[r]) for r in distinct) / 2
    assert stats["page_index"]["pool_factor"] == 3
    assert stats["page_index"]["vectors_per_page"] == vectors / len(distinct)
    assert stats["page_index"]["page_index_bytes"] == vectors * 128 * 2
    assert stats["page_index"]["pooling_s"] > 0
    assert json.load(open(os.path.join(stats["cache"]["dir"], "manifest.json")))["embedding"]["pool_factor"] == 3
    unpooled = mine_hub(ckpt, hub, tmp_path / "plain.jsonl", "--k", 3, "--cache_dir", cache)
    assert unpooled["cache"]["dir"] != stats["cache"]["dir"]
    assert json.load(open(os.path.join(unpooled["cache"]["dir"], "manifest.json")))["embedding"]["pool_factor"] == 1
    assert unpooled["page_index"]["vectors_per_page"] == sum(len(full[r]) for r in distinct) / len(distinct)
    again = mine_hub(ckpt, hub, tmp_path / "again.jsonl", "--k", 3, "--pool_factor", 3, "--cache_dir", cache)
    assert again["cache"]["dir"] == stats["cache"]["dir"] and again["cache"]["encoded"] == 0
    assert again["page_index"]["page_index_bytes"] == stats["page_index"]["page_index_bytes"]
    assert read_rows(tmp_path / "again.jsonl") == read_rows(out)
