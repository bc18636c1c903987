"""eval.py through mteb on tiny local data: metrics vs an independent computation, a real ViDoRe task class on a
local hub-layout copy, the page cache across language subsets, resume from mteb's cache, subsampling, bad input."""
import json
import math
import os

import datasets
import pytest
import torch

import eval as colintern_eval
from colintern_model import ColIntern, LoraSettings, save_checkpoint
from conftest import render_keyword_page

KEYWORDS = ["apple", "river", "chart", "table", "market", "growth", "report", "energy", "revenue", "title"]
# query i is about KEYWORDS[i]; query 0 has a second relevant page (9) so nDCG's ideal ranking has two entries
QRELS = [(i, i) for i in range(8)] + [(0, 9)]
README = "---\nconfigs:\n" + "".join(
    f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n" for c in ("corpus", "queries", "qrels")
) + "---\n"


def write_hub_layout(folder, pages, queries, qrels, query_columns=None):
    """A folder in the ViDoRe v1 hub layout: README configs + corpus/queries/qrels parquet for split test."""
    corpus = datasets.Dataset.from_dict({"corpus-id": list(range(len(pages))), "image": pages})
    parts = {
        "corpus": corpus.cast_column("image", datasets.Image()),
        "queries": datasets.Dataset.from_dict({"query-id": list(range(len(queries))), "query": queries,
                                               **(query_columns or {})}),
        "qrels": datasets.Dataset.from_dict({"query-id": [q for q, _ in qrels], "corpus-id": [p for _, p in qrels],
                                             "score": [1] * len(qrels)}),
    }
    for name, ds in parts.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        ds.to_parquet(os.path.join(folder, name, "test-00000-of-00001.parquet"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(README)
    return str(folder)


@pytest.fixture(scope="module")
def pages():
    # two page shapes (1 tile: 64 tokens; 2 tiles + thumbnail: 192), so scoring must handle ragged pages
    return [render_keyword_page(w, size=(224, 224) if i % 2 else (448, 224), variant=i) for i, w in enumerate(KEYWORDS)]


@pytest.fixture(scope="module")
def queries():
    return [f"Which page is about {w}?" for w in KEYWORDS[:8]]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A checkpoint with LoRA whose B matrices are non-zero (so LoRA changes the embeddings), and the in-memory model
    it was saved from: the independent computation uses that model, so a loading bug cannot cancel out."""
    torch.manual_seed(1)
    model, processor = ColIntern.from_pretrained(tiny_model_dir, proj_dim=32, lora=LoraSettings(r=4, alpha=8),
                                                 max_tiles=4)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path = str(tmp_path_factory.mktemp("ckpt") / "colintern_heads_epoch1.pt")
    save_checkpoint(path, model, step=10, epoch=1)
    return model.eval(), processor, path


@pytest.fixture
def counts(monkeypatch):
    """Counts the queries and pages that go through the model's forward passes."""
    seen = {"queries": 0, "pages": 0}
    forward_queries, forward_pages = ColIntern.forward_queries, ColIntern.forward_pages

    def count_queries(self, batch):
        seen["queries"] += batch["input_ids"].shape[0]
        return forward_queries(self, batch)

    def count_pages(self, batch):
        seen["pages"] += batch["input_ids"].shape[0]
        return forward_pages(self, batch)

    monkeypatch.setattr(ColIntern, "forward_queries", count_queries)
    monkeypatch.setattr(ColIntern, "forward_pages", count_pages)
    return seen


def run_eval(tmp_path, *flags):
    out = tmp_path / "out.json"
    args = colintern_eval.parse_args([*flags, "--device", "cpu", "--batch_size", "4",
                                      "--results_dir", str(tmp_path / "cache"), "--out_json", str(out)])
    summary = colintern_eval.main(args)
    with open(out) as f:
        assert json.load(f) == summary
    return summary


def independent_metrics(model, processor, queries, pages, qrels) -> dict:
    """Plain-python nDCG@5, Recall@1/5/10, MRR@10 from a naive per-pair MaxSim loop on the model's embeddings."""
    q_emb = model.encode_queries(processor, queries)
    p_emb = model.encode_pages(processor, pages)
    relevant = {q: {p for qq, p in qrels if qq == q} for q in range(len(queries))}
    totals = {"ndcg_at_5": 0.0, "recall_at_1": 0.0, "recall_at_5": 0.0, "recall_at_10": 0.0, "mrr_at_10": 0.0}
    for qi, q in enumerate(q_emb):
        scores = [float(sum(max(float(qt @ pt) for pt in p) for qt in q)) for p in p_emb]
        ranking = sorted(range(len(pages)), key=lambda j: -scores[j])
        rel = relevant[qi]
        dcg = sum(1 / math.log2(r + 2) for r, j in enumerate(ranking[:5]) if j in rel)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(5, len(rel))))
        totals["ndcg_at_5"] += dcg / idcg
        for k in (1, 5, 10):
            totals[f"recall_at_{k}"] += len(rel & set(ranking[:k])) / len(rel)
        first = next((r for r, j in enumerate(ranking[:10]) if j in rel), None)
        totals["mrr_at_10"] += 0.0 if first is None else 1 / (first + 1)
    return {k: v / len(queries) for k, v in totals.items()}


def test_exact_maxsim_handles_ragged_and_zero_padded_pages():
    # one query token; every page token scores negative against it, so a zero pad would win the max
    query = [torch.tensor([[1.0, 0.0]])]
    short = torch.tensor([[-1.0, 0.0]])
    long = torch.tensor([[-0.6, 0.8], [-0.8, 0.6]])
    expected = torch.tensor([[-1.0, -0.6]])
    assert torch.allclose(colintern_eval.exact_maxsim(query, [short, long]), expected)
    padded = torch.nn.utils.rnn.pad_sequence([short, long], batch_first=True)  # what mteb hands over when reranking
    assert torch.allclose(colintern_eval.exact_maxsim(query[0].unsqueeze(0), padded), expected)


def test_local_task_metrics_match_independent_computation_and_resume(tmp_path, pages, queries, trained, counts):
    model, processor, ckpt = trained
    folder = write_hub_layout(tmp_path / "eval", pages, queries, QRELS)
    summary = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder)
    assert counts == {"queries": len(queries), "pages": len(pages)}

    (task, reported), = summary["benchmarks"]["local"]["tasks"].items()
    assert task.startswith("eval@")
    expected = independent_metrics(model, processor, queries, pages, QRELS)
    for metric, value in expected.items():
        assert reported[metric] == pytest.approx(value, abs=1e-5), metric
    assert 0 < reported["ndcg_at_5"] < 1 and reported["recall_at_1"] < reported["recall_at_10"]
    assert summary["benchmarks"]["local"]["average"] == reported
    predictions = tmp_path / "out_predictions" / summary["revision"] / f"{task}_predictions.json"
    assert predictions.is_file()

    # a re-run finds every task in mteb's cache: nothing is encoded, the same numbers come back
    counts.update(queries=0, pages=0)
    again = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder)
    assert counts == {"queries": 0, "pages": 0}
    assert again["benchmarks"] == summary["benchmarks"]

    # a quick check on a subsample is cached apart from the full run, and encodes only the subsample
    small = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder, "--max_queries", "3", "--max_pages", "5")
    assert small["revision"] == summary["revision"] and small["experiment"]
    assert counts == {"queries": 3, "pages": 5}


def test_subsample_keeps_relevant_pages_of_kept_queries():
    queries = datasets.Dataset.from_dict({"id": [f"q{i}" for i in range(20)], "text": ["x"] * 20})
    corpus = datasets.Dataset.from_dict({"id": [f"p{i}" for i in range(50)]})
    qrels = {f"q{i}": {f"p{i}": 1, f"p{i + 20}": 1} for i in range(19)}  # q19 has no relevant page
    data = {"queries": queries, "corpus": corpus, "relevant_docs": qrels, "top_ranked": None}
    small = colintern_eval.subsample_split(data, max_queries=4, max_pages=12, seed=0)
    kept = list(small["queries"]["id"])
    pages = set(small["corpus"]["id"])
    assert len(kept) == 4 and "q19" not in kept and set(small["relevant_docs"]) == set(kept)
    assert all(set(qrels[q]) <= pages for q in kept) and len(pages) == 12
    assert list(colintern_eval.subsample_split(data, 4, 12, seed=0)["queries"]["id"]) == kept
    tight = colintern_eval.subsample_split(data, max_queries=4, max_pages=3, seed=1)
    assert len(tight["corpus"]) == 8  # relevant pages are never dropped, even past the cap


def test_revision_follows_checkpoint_content(tmp_path, trained, tiny_model_dir):
    _, _, ckpt = trained
    copy = tmp_path / os.path.basename(ckpt)
    copy.write_bytes(open(ckpt, "rb").read())
    same = colintern_eval.model_revision(str(copy), tiny_model_dir, 4)
    assert same == colintern_eval.model_revision(ckpt, tiny_model_dir, 4)
    copy.write_bytes(open(ckpt, "rb").read() + b"\0")  # any change of the file is a new revision
    assert colintern_eval.model_revision(str(copy), tiny_model_dir, 4) != same
    assert colintern_eval.model_revision(ckpt, tiny_model_dir, 2) != same
    untrained = colintern_eval.model_revision(None, tiny_model_dir, 4, seed=0)
    assert untrained.startswith("untrained-seed0-")
    assert untrained != colintern_eval.model_revision(None, tiny_model_dir, 4, seed=1)


def test_real_vidore_task_on_local_copy_via_data_dir(tmp_path, tiny_model_dir, pages, queries, counts):
    # the untrained baseline: seeded random heads, no LoRA
    data_dir = tmp_path / "vidore"
    write_hub_layout(data_dir / "arxivqa_test_subsampled_beir", pages, queries, QRELS)
    summary = run_eval(tmp_path, "--model_id", tiny_model_dir, "--seed", "3", "--tasks", "VidoreArxivQARetrieval",
                       "--data_dir", str(data_dir))
    reported = summary["benchmarks"]["ViDoRe(v1)"]["tasks"]["VidoreArxivQARetrieval"]

    assert counts == {"queries": len(queries), "pages": len(pages)}
    encoder = colintern_eval.load_encoder(model_id=tiny_model_dir, seed=3)
    assert encoder.model.lora is None and summary["revision"].startswith("untrained-seed3-")
    expected = independent_metrics(encoder.model, encoder.processor, queries, pages, QRELS)
    for metric, value in expected.items():
        assert reported[metric] == pytest.approx(value, abs=1e-5), metric
    model_folder = "colintern__" + os.path.basename(tiny_model_dir)
    assert (tmp_path / "cache" / "results" / model_folder / summary["revision"] / "VidoreArxivQARetrieval.json").is_file()


def test_page_cache_encodes_each_page_once_across_languages(tmp_path, tiny_model_dir, pages, counts):
    # ViDoRe v2's loader splits the queries by their 'language' column into 4 subsets that share one corpus
    languages = ["english", "french", "spanish", "german"]
    v2_queries = [f"Which page is about {KEYWORDS[i % 6]}? ({lang})" for lang in languages for i in range(2)]
    qrels = [(q, q % 6) for q in range(len(v2_queries))]
    data_dir = tmp_path / "vidore"
    write_hub_layout(data_dir / "esg_reports_v2", pages[:6], v2_queries, qrels,
                     query_columns={"language": [lang for lang in languages for _ in range(2)]})
    summary = run_eval(tmp_path, "--model_id", tiny_model_dir, "--tasks", "Vidore2ESGReportsRetrieval",
                       "--data_dir", str(data_dir))
    assert "Vidore2ESGReportsRetrieval" in summary["benchmarks"]["ViDoRe(v2)"]["tasks"]
    assert counts == {"queries": len(v2_queries), "pages": 6}
    stored = next((tmp_path / "cache" / "results").rglob("Vidore2ESGReportsRetrieval.json"))
    subsets = {s["hf_subset"] for s in json.loads(stored.read_text())["scores"]["test"]}
    assert subsets == set(languages)


def test_v3_task_loads_per_language_configs_and_shares_pages(tmp_path, tiny_model_dir, pages, counts):
    # ViDoRe v3 goes through mteb's generic loader: configs '<language>-corpus/-queries/-qrels', one corpus per
    # language (same pages), so only the content-keyed cache keeps it to one forward per page
    languages = ["french", "spanish", "english", "german", "italian", "portuguese"]
    folder = tmp_path / "vidore" / "vidore_v3_hr_mteb_format"
    configs = []
    for lang in languages:
        parts = {
            "corpus": datasets.Dataset.from_dict({"id": [f"c{i}" for i in range(4)], "image": pages[:4]})
            .cast_column("image", datasets.Image()),
            "queries": datasets.Dataset.from_dict({"id": [f"{lang}{i}" for i in range(2)],
                                                   "text": [f"Which page is about {KEYWORDS[i]}?" for i in range(2)]}),
            "qrels": datasets.Dataset.from_dict({"query-id": [f"{lang}0", f"{lang}1"], "corpus-id": ["c0", "c1"],
                                                 "score": [1, 1]}),
        }
        for name, ds in parts.items():
            os.makedirs(folder / lang / name)
            ds.to_parquet(str(folder / lang / name / "test-00000-of-00001.parquet"))
            configs.append(f"- config_name: {lang}-{name}\n  data_files:\n  - split: test\n    path: {lang}/{name}/test-*\n")
    flags = ["--model_id", tiny_model_dir, "--tasks", "Vidore3HrRetrieval", "--data_dir", str(tmp_path / "vidore")]
    with pytest.raises(ValueError, match="lacks the dataset configs.*french-corpus"):
        run_eval(tmp_path, *flags)  # no README configs block yet
    (folder / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    summary = run_eval(tmp_path, *flags)
    assert "Vidore3HrRetrieval" in summary["benchmarks"]["ViDoRe(v3)"]["tasks"]
    assert counts == {"queries": 2 * len(languages), "pages": 4}


def test_list_prints_vidore_benchmarks_and_tasks(capsys):
    assert colintern_eval.main(colintern_eval.parse_args(["--list"])) is None
    out = capsys.readouterr().out
    for name in ("ViDoRe(v1)", "ViDoRe(v2)", "ViDoRe(v3)", "VidoreArxivQARetrieval", "mteb/arxivqa_test_subsampled_beir"):
        assert name in out


def test_bad_input_names_the_problem(tmp_path, tiny_model_dir, trained):
    def run(*flags):
        return colintern_eval.main(colintern_eval.parse_args([*flags, "--device", "cpu",
                                                              "--results_dir", str(tmp_path / "cache")]))

    with pytest.raises(ValueError, match=r"unknown benchmark 'ViDoRe\(v9\)'.*ViDoRe\(v1\)"):
        run("--model_id", tiny_model_dir, "--benchmarks", "ViDoRe(v9)")
    with pytest.raises(ValueError, match="unknown task 'NoSuchTask'.*VidoreArxivQARetrieval"):
        run("--model_id", tiny_model_dir, "--benchmarks", "ViDoRe(v1)", "--tasks", "NoSuchTask")
    with pytest.raises(FileNotFoundError, match="arxivqa_test_subsampled_beir"):
        run("--model_id", tiny_model_dir, "--tasks", "VidoreArxivQARetrieval", "--data_dir", str(tmp_path))
    wrong = tmp_path / "layout" / "arxivqa_test_subsampled_beir"
    os.makedirs(wrong / "corpus")
    datasets.Dataset.from_dict({"corpus-id": [0]}).to_parquet(str(wrong / "corpus" / "test-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="lacks the dataset configs.*queries.*qrels"):
        run("--model_id", tiny_model_dir, "--tasks", "VidoreArxivQARetrieval", "--data_dir", str(tmp_path / "layout"))
    with pytest.raises(FileNotFoundError, match="--local_task .*nowhere"):
        run("--model_id", tiny_model_dir, "--local_task", str(tmp_path / "nowhere"))

    # a checkpoint made for another backbone
    ckpt = torch.load(trained[2], weights_only=True)
    ckpt["meta"]["hidden_size"] = 999
    bad = str(tmp_path / "other_backbone.pt")
    torch.save(ckpt, bad)
    folder = write_hub_layout(tmp_path / "eval", [render_keyword_page("a")], ["Which page is about a?"], [(0, 0)])
    with pytest.raises(ValueError, match="other_backbone.pt.*hidden size 999"):
        run("--ckpt", bad, "--local_task", folder)
    with pytest.raises(SystemExit):
        colintern_eval.parse_args(["--ckpt", bad])  # nothing to evaluate
