"""eval.py through mteb on tiny local data: metrics vs an independent computation, a real ViDoRe task class on a
local hub-layout copy, the page cache across language subsets, resume from mteb's cache, subsampling, bad input."""

import json
import math
import os
import re
import shutil

import datasets
import pytest
import torch

import colintern_mteb as cmteb
import colintern_scoring as cs
import eval as colintern_eval
from colintern_checkpoint import load_checkpoint
from colintern_cli import metric_label
from colintern_model import ColIntern, LoraSettings, save_checkpoint
from make_synthetic_data import WORDS, render_keyword_page

KEYWORDS = WORDS[:10]
# query i is about KEYWORDS[i]; query 0 has a second relevant page (9) so nDCG's ideal ranking has two entries
QRELS = [(i, i) for i in range(8)] + [(0, 9)]
README = (
    "---\nconfigs:\n"
    + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n"
        for c in ("corpus", "queries", "qrels")
    )
    + "---\n"
)


def write_hub_layout(folder, pages, queries, qrels, query_columns=None):
    """A folder in the ViDoRe v1 hub layout: README configs + corpus/queries/qrels parquet for split test."""
    corpus = datasets.Dataset.from_dict({"corpus-id": list(range(len(pages))), "image": pages})
    parts = {
        "corpus": corpus.cast_column("image", datasets.Image()),
        "queries": datasets.Dataset.from_dict(
            {"query-id": list(range(len(queries))), "query": queries, **(query_columns or {})}
        ),
        "qrels": datasets.Dataset.from_dict(
            {"query-id": [q for q, _ in qrels], "corpus-id": [p for _, p in qrels], "score": [1] * len(qrels)}
        ),
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
    model, processor = ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=32, lora=LoraSettings(r=4, alpha=8), max_tiles=4
    )
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
    args = colintern_eval.parse_args(
        [
            *flags,
            "--device",
            "cpu",
            "--encode_batch_size",
            "4",
            "--results_dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ]
    )
    summary = colintern_eval.main(args)
    with open(out) as f:
        assert json.load(f) == summary
    return summary


def independent_metrics(model, processor, queries, pages, qrels, pool=None, rerank=0) -> dict:
    """Plain-python nDCG@5, Recall@1/5/10, MRR@10 from a naive per-pair MaxSim loop on the model's embeddings.
    `pool`: a function applied to each page's embeddings first; `rerank`: the top RERANK of that ranking re-sorted
    by their scores on the unpooled embeddings, ahead of the rest."""
    q_emb = model.encode_queries(processor, queries)
    full = model.encode_pages(processor, pages)
    p_emb = [pool(p) for p in full] if pool else full
    relevant = {q: {p for qq, p in qrels if qq == q} for q in range(len(queries))}
    totals = {"ndcg_at_5": 0.0, "recall_at_1": 0.0, "recall_at_5": 0.0, "recall_at_10": 0.0, "mrr_at_10": 0.0}
    naive = lambda q, p: float(sum(max(float(qt @ pt) for pt in p) for qt in q))  # noqa: E731
    for qi, q in enumerate(q_emb):
        scores = [naive(q, p) for p in p_emb]
        ranking = sorted(range(len(pages)), key=lambda j: -scores[j])
        if rerank:
            ranking = sorted(ranking[:rerank], key=lambda j: -naive(q, full[j])) + ranking[rerank:]
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
    assert torch.allclose(cmteb.exact_maxsim(query, [short, long]), expected)
    padded = torch.nn.utils.rnn.pad_sequence([short, long], batch_first=True)  # what mteb hands over when reranking
    assert torch.allclose(cmteb.exact_maxsim(query[0].unsqueeze(0), padded), expected)


def test_local_task_metrics_match_independent_computation_and_resume(tmp_path, pages, queries, trained, counts):
    model, processor, ckpt = trained
    folder = write_hub_layout(tmp_path / "eval", pages, queries, QRELS)
    summary = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder)
    assert counts == {"queries": len(queries), "pages": len(pages)}

    ((task, reported),) = summary["benchmarks"]["local"]["tasks"].items()
    assert task.startswith("eval@")
    expected = independent_metrics(model, processor, queries, pages, QRELS)
    for metric, value in expected.items():
        assert reported[metric] == pytest.approx(value, abs=1e-5), metric
    assert 0 < reported["ndcg_at_5"] < 1 and reported["recall_at_1"] < reported["recall_at_10"]
    assert summary["benchmarks"]["local"]["average"] == reported
    predictions = tmp_path / "out_predictions" / summary["task_revisions"][task] / f"{task}_predictions.json"
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


def test_mteb_internals_eval_relies_on(tmp_path, tiny_model_dir, pages, queries, capsys):
    """What eval.py's mteb adapter (uses_generic_retrieval_loader, read_dataset_from, subsample_on_load) and its
    custom local task rely on, checked directly, so that an mteb upgrade breaking one fails here, naming it."""
    import inspect

    import mteb

    from colintern_data import datasets_cache_for

    missing = {"cache", "overwrite_strategy", "encode_kwargs", "prediction_folder", "co2_tracker"} - set(
        inspect.signature(mteb.evaluate).parameters
    )
    assert not missing, f"mteb.evaluate no longer takes {missing}, which evaluate_each passes"

    loaders = {
        name: cmteb.uses_generic_retrieval_loader(mteb.get_task(name))
        for name in ("VidoreArxivQARetrieval", "Vidore2ESGReportsRetrieval", "Vidore3HrRetrieval")
    }
    assert loaders == {
        "VidoreArxivQARetrieval": False,
        "Vidore2ESGReportsRetrieval": False,
        "Vidore3HrRetrieval": True,
    }, f"mteb's ViDoRe tasks changed loaders ({loaders}): required_configs no longer names the configs they read"

    # a hub task pointed at a local copy (read_dataset_from) loads from that folder, subsampled (subsample_on_load)
    copy = write_hub_layout(
        tmp_path / "copies" / "arxivqa_test_subsampled_beir", pages[:4], queries[:4], [(i, i) for i in range(4)]
    )
    task = mteb.get_task("VidoreArxivQARetrieval")
    assert cmteb.point_at_local_copy(task, str(tmp_path / "copies")) == copy
    cmteb.subsample_on_load(task, max_queries=2, max_pages=3, seed=0)
    with datasets_cache_for(copy):
        task.load_data()
    loaded = task.dataset["default"]["test"]
    assert set(loaded["queries"]["text"]) < set(queries[:4]) and len(loaded["queries"]) == 2, (
        "VidoreArxivQARetrieval did not load the local copy's queries through the instance's metadata.dataset path"
    )
    assert len(loaded["corpus"]) == 3 and set(loaded["relevant_docs"]) == set(loaded["queries"]["id"]), (
        "convert_v1_dataset_format_to_v2 no longer leaves task.dataset[subset][split] for subsample_on_load"
    )
    assert type(task).metadata.dataset["path"] == "mteb/arxivqa_test_subsampled_beir"

    # a local task (mteb's custom-task pattern) goes through mteb.evaluate: it loads through the instance's
    # load_data (so subsampled), keeps its metadata after mteb unloads it, and is not reloaded once cached
    task = cmteb.make_local_task(
        write_hub_layout(tmp_path / "eval", pages[:4], queries[:4], [(i, i) for i in range(4)])
    )
    name = task.metadata.name
    cmteb.subsample_on_load(task, max_queries=2, max_pages=None, seed=0)
    encoder = cmteb.load_encoder(cmteb.EncoderSettings(model_id=tiny_model_dir))
    cache = mteb.ResultCache(str(tmp_path / "cache"))
    capsys.readouterr()
    outcomes = [
        mteb.evaluate(
            encoder,
            task,
            cache=cache,
            overwrite_strategy="only-missing",
            co2_tracker=False,
            encode_kwargs={"batch_size": 4, "show_progress_bar": False},
        )
        for _ in range(2)
    ]
    printed = capsys.readouterr().out
    assert [[r.task_name for r in o.task_results] for o in outcomes] == [[name], [name]]
    assert task.metadata.name == name, "mteb.evaluate dropped the local task's class metadata"
    assert printed.count(f"{name} default/test: 2 of 4 queries") == 1 and encoder.queries_encoded == 2, (
        "mteb.evaluate no longer loads a task through its instance's load_data, only when its results are missing"
    )
    scores = [o.task_results[0].get_score(getter=lambda s: s["ndcg_at_5"]) for o in outcomes]
    assert scores[0] == pytest.approx(scores[1])


def test_subsample_keeps_relevant_pages_of_kept_queries():
    queries = datasets.Dataset.from_dict({"id": [f"q{i}" for i in range(20)], "text": ["x"] * 20})
    corpus = datasets.Dataset.from_dict({"id": [f"p{i}" for i in range(50)]})
    qrels = {f"q{i}": {f"p{i}": 1, f"p{i + 20}": 1} for i in range(19)}  # q19 has no relevant page
    data = {"queries": queries, "corpus": corpus, "relevant_docs": qrels, "top_ranked": None}
    small = cmteb.subsample_split(data, max_queries=4, max_pages=12, seed=0)
    kept = list(small["queries"]["id"])
    pages = set(small["corpus"]["id"])
    assert len(kept) == 4 and "q19" not in kept and set(small["relevant_docs"]) == set(kept)
    assert all(set(qrels[q]) <= pages for q in kept) and len(pages) == 12
    assert list(cmteb.subsample_split(data, 4, 12, seed=0)["queries"]["id"]) == kept
    tight = cmteb.subsample_split(data, max_queries=4, max_pages=3, seed=1)
    assert len(tight["corpus"]) == 8  # relevant pages are never dropped, even past the cap


def test_result_key_follows_scores_and_data(trained, tiny_model_dir):
    """The result key is score_identity (each of its ingredients: test_colintern_model) plus the data; what
    load_encoder loaded is what it keys: the same checkpoint twice shares a key, other heads (the untrained
    baseline's seed) or another pool factor do not. The revision's label names the model for people."""
    _, _, ckpt = trained
    key = cmteb.result_key
    scores = cs.score_identity(trained[0].embedding_identity(), torch.float32, "cpu")
    assert key(scores, None) == key(json.loads(json.dumps(scores)), None)  # order-free
    assert len({key(scores, None), key(scores, "data-a"), key(scores, "data-b")}) == 3

    def revision(**kwargs):
        return cmteb.load_encoder(cmteb.EncoderSettings(**kwargs)).revision_for(None)

    same = revision(ckpt=ckpt)
    assert same == revision(ckpt=ckpt) and same.startswith(os.path.splitext(os.path.basename(ckpt))[0] + "-")
    assert revision(ckpt=ckpt, pool_factor=3) != same
    untrained = revision(model_id=tiny_model_dir, seed=0)
    assert untrained.startswith("untrained-seed0-") and untrained != revision(model_id=tiny_model_dir, seed=1)


def test_files_fingerprint_follows_paths_sizes_and_mtimes(tmp_path):
    (tmp_path / "qrels").mkdir()
    qrels = tmp_path / "qrels" / "test.parquet"
    qrels.write_bytes(b"abc")
    first = colintern_eval.files_fingerprint(str(tmp_path))
    (tmp_path / ".cache").mkdir()  # hf download's own bookkeeping is not data
    (tmp_path / ".cache" / "x").write_text("y")
    assert colintern_eval.files_fingerprint(str(tmp_path)) == first
    stat = os.stat(qrels)
    qrels.write_bytes(b"abd")  # same size, same path
    os.utime(qrels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert colintern_eval.files_fingerprint(str(tmp_path)) != first


def test_untrained_baseline_heads_come_from_the_cpu_generator(tiny_model_dir, monkeypatch):
    """The baseline's heads are what nn.Linear draws on the CPU after manual_seed(seed), the same as the heads had
    before this was device-independent (so cached CPU results stay valid), and they do not depend on the heads'
    device: drawing them on another device's generator is what the CPU draw replaces (faked here by a head whose
    reset_parameters would draw other numbers; a real GPU is untested)."""
    model, _ = ColIntern.from_pretrained(tiny_model_dir, proj_dim=32)
    for head in (model.query_head, model.page_head):  # a device generator's draws, had reset_parameters been used
        monkeypatch.setattr(head, "reset_parameters", lambda: torch.nn.init.zeros_(head.weight))
    cmteb.baseline_heads(model, seed=3)
    torch.manual_seed(3)
    q, p = (torch.nn.Linear(model.hidden_size, 32) for _ in range(2))
    for head, expected in ((model.query_head, q), (model.page_head, p)):
        assert torch.equal(head.weight, expected.weight) and torch.equal(head.bias, expected.bias)
    assert not torch.equal(model.query_head.weight, model.page_head.weight)


def test_real_vidore_task_on_local_copy_via_data_dir(tmp_path, tiny_model_dir, pages, queries, counts):
    # the untrained baseline: seeded random heads, no LoRA
    data_dir = tmp_path / "vidore"
    copy = write_hub_layout(data_dir / "arxivqa_test_subsampled_beir", pages, queries, QRELS)
    flags = [
        "--model_id",
        tiny_model_dir,
        "--seed",
        "3",
        "--tasks",
        "VidoreArxivQARetrieval",
        "--data_dir",
        str(data_dir),
    ]
    summary = run_eval(tmp_path, *flags)
    reported = summary["benchmarks"]["ViDoRe(v1)"]["tasks"]["VidoreArxivQARetrieval"]

    assert counts == {"queries": len(queries), "pages": len(pages)}
    encoder = cmteb.load_encoder(cmteb.EncoderSettings(model_id=tiny_model_dir, seed=3))
    assert encoder.model.lora is None and summary["revision"].startswith("untrained-seed3-")
    expected = independent_metrics(encoder.model, encoder.processor, queries, pages, QRELS)
    for metric, value in expected.items():
        assert reported[metric] == pytest.approx(value, abs=1e-5), metric
    revision = summary["task_revisions"]["VidoreArxivQARetrieval"]
    model_folder = "colintern__" + os.path.basename(tiny_model_dir)
    assert (tmp_path / "cache" / "results" / model_folder / revision / "VidoreArxivQARetrieval.json").is_file()
    assert summary["benchmarks"]["ViDoRe(v1)"]["label"] == "ViDoRe(v1), 1 of 10 tasks (9 not selected)"

    # a corrected qrels file, the same --results_dir: evaluated afresh on the new data, never the cached score
    corrected = [(i, (i + 1) % 10) for i in range(8)]
    datasets.Dataset.from_dict(
        {"query-id": [q for q, _ in corrected], "corpus-id": [p for _, p in corrected], "score": [1] * len(corrected)}
    ).to_parquet(os.path.join(copy, "qrels", "test-00000-of-00001.parquet"))
    counts.update(queries=0, pages=0)
    again = run_eval(tmp_path, *flags)
    assert counts == {"queries": len(queries), "pages": len(pages)}
    assert again["task_revisions"]["VidoreArxivQARetrieval"] != revision
    rescored = again["benchmarks"]["ViDoRe(v1)"]["tasks"]["VidoreArxivQARetrieval"]
    expected = independent_metrics(encoder.model, encoder.processor, queries, pages, corrected)
    for metric, value in expected.items():
        assert rescored[metric] == pytest.approx(value, abs=1e-5), metric
    assert rescored != reported


def test_page_cache_encodes_each_page_once_across_languages(tmp_path, tiny_model_dir, pages, counts):
    # ViDoRe v2's loader splits the queries by their 'language' column into 4 subsets that share one corpus
    languages = ["english", "french", "spanish", "german"]
    v2_queries = [f"Which page is about {KEYWORDS[i % 6]}? ({lang})" for lang in languages for i in range(2)]
    qrels = [(q, q % 6) for q in range(len(v2_queries))]
    data_dir = tmp_path / "vidore"
    write_hub_layout(
        data_dir / "esg_reports_v2",
        pages[:6],
        v2_queries,
        qrels,
        query_columns={"language": [lang for lang in languages for _ in range(2)]},
    )
    summary = run_eval(
        tmp_path, "--model_id", tiny_model_dir, "--tasks", "Vidore2ESGReportsRetrieval", "--data_dir", str(data_dir)
    )
    assert "Vidore2ESGReportsRetrieval" in summary["benchmarks"]["ViDoRe(v2)"]["tasks"]
    assert counts == {"queries": len(v2_queries), "pages": 6}
    stored = next((tmp_path / "cache" / "results").rglob("Vidore2ESGReportsRetrieval.json"))
    subsets = {s["hf_subset"] for s in json.loads(stored.read_text())["scores"]["test"]}
    assert subsets == set(languages)


V3_LANGUAGES = ["french", "spanish", "english", "german", "italian", "portuguese"]


def v3_queries(lang):
    """Two queries per language, on different pages for each language, so a mix-up of languages shows."""
    i = V3_LANGUAGES.index(lang)
    return [(f"{lang}{j}", f"Which page is about {KEYWORDS[(i + j) % 4]}?", f"c{(i + j) % 4}") for j in range(2)]


def write_v3_layout(folder, pages, languages=V3_LANGUAGES, readme=True, dataset_info=False):
    """A ViDoRe v3 copy as mteb's generic loader reads it: configs '<language>-corpus/-queries/-qrels', one corpus per
    language (the same 4 pages), a README configs block (and, like the hub's, a dataset_info block with row counts)."""
    configs, infos = [], []
    for lang in languages:
        rows = v3_queries(lang)
        parts = {
            "corpus": datasets.Dataset.from_dict({"id": [f"c{i}" for i in range(4)], "image": pages[:4]}).cast_column(
                "image", datasets.Image()
            ),
            "queries": datasets.Dataset.from_dict({"id": [q for q, _, _ in rows], "text": [t for _, t, _ in rows]}),
            "qrels": datasets.Dataset.from_dict(
                {"query-id": [q for q, _, _ in rows], "corpus-id": [c for _, _, c in rows], "score": [1] * len(rows)}
            ),
        }
        for name, ds in parts.items():
            os.makedirs(folder / lang / name)
            ds.to_parquet(str(folder / lang / name / "test-00000-of-00001.parquet"))
            configs.append(
                f"- config_name: {lang}-{name}\n  data_files:\n  - split: test\n    path: {lang}/{name}/test-*\n"
            )
            infos.append(f"- config_name: {lang}-{name}\n  splits:\n  - name: test\n    num_examples: {len(ds)}\n")
    if readme:
        (folder / "README.md").write_text(
            "---\n"
            + ("dataset_info:\n" + "".join(infos) if dataset_info else "")
            + "configs:\n"
            + "".join(configs)
            + "---\n"
        )
    return folder


def test_v3_task_loads_per_language_configs_and_shares_pages(tmp_path, tiny_model_dir, pages, counts):
    # ViDoRe v3 goes through mteb's generic loader: one corpus per language (same pages), so only the content-keyed
    # cache keeps it to one forward per page
    folder = write_v3_layout(tmp_path / "vidore" / "vidore_v3_hr_mteb_format", pages, readme=False)
    flags = ["--model_id", tiny_model_dir, "--tasks", "Vidore3HrRetrieval", "--data_dir", str(tmp_path / "vidore")]
    with pytest.raises(ValueError, match="lacks the dataset configs.*french-corpus"):
        run_eval(tmp_path, *flags)  # no README configs block yet
    shutil.rmtree(folder)
    write_v3_layout(folder, pages)
    summary = run_eval(tmp_path, *flags)
    assert "Vidore3HrRetrieval" in summary["benchmarks"]["ViDoRe(v3)"]["tasks"]
    assert counts == {"queries": 2 * len(V3_LANGUAGES), "pages": 4}


def test_incomplete_local_copy_names_the_missing_config_before_encoding(tmp_path, tiny_model_dir, pages, counts):
    # the hub README lists every language's configs and row counts; only the English files were downloaded
    folder = write_v3_layout(tmp_path / "vidore" / "vidore_v3_hr_mteb_format", pages, dataset_info=True)
    for lang in V3_LANGUAGES:
        if lang != "english":
            shutil.rmtree(folder / lang)
    flags = ["--model_id", tiny_model_dir, "--tasks", "Vidore3HrRetrieval", "--data_dir", str(tmp_path / "vidore")]
    with pytest.raises(FileNotFoundError) as error:
        run_eval(tmp_path, *flags)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and "config 'french-corpus' (french/corpus/test-*)" in message
    assert "and 9 more" in message and "hf download vidore/vidore_v3_hr_mteb_format" in message
    assert counts == {"queries": 0, "pages": 0}

    # every file there, one shard short of the rows the README lists
    shutil.rmtree(folder)
    write_v3_layout(folder, pages, dataset_info=True)
    readme = (folder / "README.md").read_text()
    (folder / "README.md").write_text(
        readme.replace(
            "config_name: german-queries\n  splits:\n  - name: test\n    num_examples: 2",
            "config_name: german-queries\n  splits:\n  - name: test\n    num_examples: 3",
        )
    )
    with pytest.raises(ValueError, match=r"'german-queries' split 'test' has 2 of the 3 rows"):
        run_eval(tmp_path, *flags)
    assert counts == {"queries": 0, "pages": 0}


class FakeResult:
    """What summarize reads of an mteb TaskResult: scores[split] = [{hf_subset, metric: value}], get_score."""

    def __init__(self, value):
        self.scores = {"test": [{"hf_subset": "default", **dict.fromkeys(cmteb.METRICS, value)}]}

    def get_score(self, getter):
        return getter(self.scores["test"][0])


def test_v3_average_is_labelled_as_the_public_tasks_only(capsys):
    groups = colintern_eval.select_tasks(["ViDoRe(v3)"], None)
    public, skipped = colintern_eval.drop_private(groups)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "Vidore3TelecomRetrieval, Vidore3NuclearRetrieval" in line
    assert set(skipped) == {"Vidore3TelecomRetrieval", "Vidore3NuclearRetrieval"} and len(public) == 8
    results = {task.metadata.name: FakeResult(0.1 * i) for i, (_, task) in enumerate(public)}
    entry = colintern_eval.summarize(groups, results, skipped, {})["ViDoRe(v3)"]
    assert entry["label"] == "ViDoRe(v3), 8 of 10 tasks (2 private)"
    assert (entry["tasks_run"], entry["tasks_total"], set(entry["skipped"])) == (8, 10, set(skipped))
    assert entry["average"]["ndcg_at_10"] == pytest.approx(sum(0.1 * i for i in range(8)) / 8)
    table = colintern_eval.format_table({"ViDoRe(v3)": entry})
    # ViDoRe(v3)'s leaderboard ranks by nDCG@10 (mteb's task metadata), v1's by nDCG@5: recorded and said
    assert entry["main_score"] == "ndcg_at_10"
    assert (
        colintern_eval.summarize(colintern_eval.select_tasks(["ViDoRe(v1)"], None)[:1], {}, {}, {})["ViDoRe(v1)"][
            "main_score"
        ]
        == "ndcg_at_5"
    )
    assert "ViDoRe(v3), 8 of 10 tasks (2 private)  (scores x100; main score nDCG@10)" in table
    assert "not the ViDoRe(v3) score" in table
    # the columns are headed as the plots name the metrics (colintern_cli.metric_label), and line up
    head, rule, first = table.splitlines()[2:5]
    assert head.split() == ["task", "nDCG@5", "nDCG@10", "Recall@1", "Recall@5", "Recall@10", "MRR@10"]
    assert head.split()[1:] == [metric_label(m) for m in cmteb.METRICS]
    assert len(head) == len(rule) == len(first)


def test_offline_without_data_dir_is_one_line_per_task_with_the_download(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A hub task whose dataset cannot be fetched (no network: a ConnectionError somewhere in the chain, as datasets
    and huggingface_hub wrap it) fails in one line naming the hf download command and --data_dir, with no
    traceback; another failure keeps its traceback."""

    def evaluate(encoder, task, **kwargs):
        try:
            raise ConnectionError(f"Couldn't reach {task.metadata.dataset['path']} on the Hub")
        except ConnectionError as e:
            raise RuntimeError("dataset loading failed") from e

    monkeypatch.setattr(colintern_eval.mteb, "evaluate", evaluate)
    with pytest.raises(colintern_eval.TasksFailed):
        run_eval(tmp_path, "--model_id", tiny_model_dir, "--tasks", "VidoreArxivQARetrieval", "VidoreDocVQARetrieval")
    captured = capsys.readouterr()
    lines = [x for x in captured.out.splitlines() if "cannot be fetched" in x]
    assert len(lines) == 2 and "Traceback" not in captured.err + captured.out
    assert re.fullmatch(
        r"task VidoreArxivQARetrieval failed: its dataset (\w+)/arxivqa_test_subsampled_beir cannot be "
        r"fetched from the hub \(offline\?\)\. Copy it on a machine with internet: hf download "
        r"\1/arxivqa_test_subsampled_beir --repo-type dataset --revision \S+ --local-dir "
        r"DIR/arxivqa_test_subsampled_beir, then pass --data_dir DIR; going on with the other tasks",
        lines[0],
    ), lines[0]
    monkeypatch.setattr(colintern_eval.mteb, "evaluate", lambda *a, **k: 1 / 0)
    with pytest.raises(colintern_eval.TasksFailed):
        run_eval(tmp_path, "--model_id", tiny_model_dir, "--tasks", "VidoreArxivQARetrieval")
    assert "ZeroDivisionError" in capsys.readouterr().err  # a bug keeps its traceback


def test_private_skipped_failure_isolated_and_languages_reported(
    tmp_path, tiny_model_dir, pages, queries, counts, monkeypatch
):
    data_dir = tmp_path / "vidore"
    write_v3_layout(data_dir / "vidore_v3_hr_mteb_format", pages)
    write_hub_layout(data_dir / "arxivqa_test_subsampled_beir", pages, queries, QRELS)
    encode = cmteb.ColInternEncoder.encode

    def encode_failing_on_arxivqa(self, inputs, *, task_metadata, **kwargs):
        if task_metadata.name == "VidoreArxivQARetrieval":
            raise RuntimeError("CUDA out of memory (simulated)")
        return encode(self, inputs, task_metadata=task_metadata, **kwargs)

    monkeypatch.setattr(cmteb.ColInternEncoder, "encode", encode_failing_on_arxivqa)

    # the failing task comes first: the others still run; private tasks are skipped offline without a copy
    with pytest.raises(colintern_eval.TasksFailed) as failure:
        run_eval(
            tmp_path,
            "--model_id",
            tiny_model_dir,
            "--data_dir",
            str(data_dir),
            "--tasks",
            "VidoreArxivQARetrieval",
            "Vidore3TelecomRetrieval",
            "Vidore3HrRetrieval",
            "Vidore3NuclearRetrieval",
        )
    summary = failure.value.summary
    assert "VidoreArxivQARetrieval: RuntimeError: CUDA out of memory" in failure.value.code  # exit status 1
    assert json.loads((tmp_path / "out.json").read_text()) == summary
    assert summary["failed"] == {"VidoreArxivQARetrieval": "RuntimeError: CUDA out of memory (simulated)"}
    v1, v3 = summary["benchmarks"]["ViDoRe(v1)"], summary["benchmarks"]["ViDoRe(v3)"]
    assert v1["failed"] == summary["failed"] and v1["tasks"] == {} and v1["average"] == {}
    assert v3["label"] == "ViDoRe(v3), 1 of 10 tasks (2 private, 7 not selected)"
    assert set(v3["skipped"]) == {"Vidore3TelecomRetrieval", "Vidore3NuclearRetrieval"}

    assert counts == {"queries": 2 * len(V3_LANGUAGES), "pages": 4}

    # per-language scores beside the task's average, each against an independent computation on that language
    languages = v3["subsets"]["Vidore3HrRetrieval"]
    assert set(languages) == set(V3_LANGUAGES)
    encoder = cmteb.load_encoder(cmteb.EncoderSettings(model_id=tiny_model_dir, seed=0))
    for lang, reported in languages.items():
        rows = v3_queries(lang)
        expected = independent_metrics(
            encoder.model,
            encoder.processor,
            [t for _, t, _ in rows],
            pages[:4],
            [(j, int(c[1:])) for j, (_, _, c) in enumerate(rows)],
        )
        for metric, value in expected.items():
            assert reported[metric] == pytest.approx(value, abs=1e-5), (lang, metric)
    task = v3["tasks"]["Vidore3HrRetrieval"]
    assert task["ndcg_at_10"] == pytest.approx(sum(m["ndcg_at_10"] for m in languages.values()) / len(languages))


def test_training_datasets_follow_the_checkpoint_lineage(tmp_path, trained, tiny_model_dir):
    from mteb.models.model_implementations.colpali_models import COLPALI_TRAINING_DATA

    assert cmteb.MTEB_TRAINING_DATASETS["vidore/colpali_train_set"] == COLPALI_TRAINING_DATA
    model, _, old = trained
    lineage = str(tmp_path / "mined_from_colpali.pt")
    save_checkpoint(lineage, model, step=20, epoch=2, training_data=["vidore/colpali_train_set", "/data/other"])
    encoder = cmteb.load_encoder(cmteb.EncoderSettings(ckpt=lineage))
    assert encoder.mteb_model_meta.training_datasets == COLPALI_TRAINING_DATA
    assert encoder.training_data == ["/data/other", "vidore/colpali_train_set"]
    # a local copy named as --data_dir names it counts too; other data maps to nothing
    assert cmteb.mteb_training_datasets(["/copies/colpali_train_set/"]) == COLPALI_TRAINING_DATA
    assert cmteb.mteb_training_datasets(["outputs/synthetic/train"]) == set()
    # a checkpoint that records no lineage still loads, and declares none
    assert "training_data" not in load_checkpoint(old)["meta"]
    assert cmteb.load_encoder(cmteb.EncoderSettings(ckpt=old)).mteb_model_meta.training_datasets == set()


def test_list_prints_vidore_benchmarks_and_tasks(capsys):
    assert colintern_eval.main(colintern_eval.parse_args(["--list"])) is None
    out = capsys.readouterr().out
    for name in (
        "ViDoRe(v1)",
        "ViDoRe(v2)",
        "ViDoRe(v3)",
        "VidoreArxivQARetrieval",
        "mteb/arxivqa_test_subsampled_beir",
    ):
        assert name in out


def test_bad_input_names_the_problem(tmp_path, tiny_model_dir, trained):
    def run(*flags):
        return colintern_eval.main(
            colintern_eval.parse_args([*flags, "--device", "cpu", "--results_dir", str(tmp_path / "cache")])
        )

    with pytest.raises(ValueError, match=r"unknown benchmark 'ViDoRe\(v9\)'.*ViDoRe\(v1\)"):
        run("--model_id", tiny_model_dir, "--benchmarks", "ViDoRe(v9)")
    with pytest.raises(
        ValueError,
        match=r"unknown task 'NoSuchTask' in benchmarks \['ViDoRe\(v1\)'\]: python eval.py "
        r"--list names them \(\d+ tasks there\)$",
    ):
        run("--model_id", tiny_model_dir, "--benchmarks", "ViDoRe(v1)", "--tasks", "NoSuchTask")
    with pytest.raises(
        ValueError,
        match=r"unknown task 'VidoreArxivQARetreival' in .*: did you mean "
        r"'VidoreArxivQARetrieval'",
    ):  # a typo: the closest names, not all of them
        run("--model_id", tiny_model_dir, "--tasks", "VidoreArxivQARetreival")
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


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_score_dtype_defaults_to_exact_fp32_is_printed_used_and_keys_results(
    tiny_model_dir, monkeypatch, capsys, native
):
    """Evaluation scores in fp32 unless asked (whatever the CPU probe says); --score_dtype bf16 or auto is printed,
    resolved in the loader keywords (so in the result key) and is what similarity() multiplies in."""
    import colintern_scoring as cs

    monkeypatch.setattr(cs, "cpu_has_native_bf16", lambda: native)
    assert colintern_eval.parse_args(["--model_id", "x", "--local_task", "x"]).score_dtype == "fp32"
    encoders = {
        flag: cmteb.load_encoder(cmteb.EncoderSettings(model_id=tiny_model_dir, score_dtype=flag))
        for flag in ("fp32", "bf16", "auto")
    }
    printed = capsys.readouterr().out
    auto = "bf16" if native else "fp32"
    for flag, used in (("fp32", "fp32"), ("bf16", "bf16"), ("auto", auto)):
        assert f"score dtype {used} (--score_dtype {flag}; " in printed
        assert encoders[flag].mteb_model_meta.loader_kwargs["score_dtype"] == used
        assert encoders[flag].score_dtype == cs.SCORE_DTYPES[used]
    assert encoders["fp32"].revision_for(None) != encoders["bf16"].revision_for(None)
    assert encoders["auto"].revision_for(None) == encoders[auto].revision_for(None)
    assert cmteb.load_encoder(cmteb.EncoderSettings(model_id=tiny_model_dir)).revision_for(None) == encoders[
        "fp32"
    ].revision_for(None)

    seen = []
    real = cs.maxsim_tokens
    monkeypatch.setattr(cs, "maxsim_tokens", lambda t, p, *a, **k: seen.append(t.dtype) or real(t, p, *a, **k))
    g = torch.Generator().manual_seed(0)
    q = [torch.nn.functional.normalize(torch.randn(5, 128, generator=g), dim=-1)]
    p = [torch.nn.functional.normalize(torch.randn(9, 128, generator=g), dim=-1)]
    exact = encoders["fp32"].similarity(q, p)
    assert seen == [torch.float32] and torch.allclose(exact, (q[0] @ p[0].T).amax(dim=1).sum().view(1, 1))
    rounded = encoders["bf16"].similarity(q, p)
    assert seen[1] == (torch.bfloat16 if native else torch.float32)
    assert 0 < float((rounded - exact).abs().max()) <= cs.score_error_bound(torch.bfloat16, 5, 128)


def test_quantized_checkpoint_evaluates_under_its_own_result_key(
    tmp_path, tiny_model_dir, pages, queries, counts, capsys
):
    """A checkpoint trained on a 4-bit backbone evaluates on one; naming its quantisation explicitly is the same
    setting (cached, nothing encoded), evaluating it unquantised is another result key (and says so)."""
    torch.manual_seed(1)
    model, _ = ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=32, lora=LoraSettings(r=4, alpha=8), max_tiles=4, quantize="4bit"
    )
    ckpt = str(tmp_path / "q4.pt")
    save_checkpoint(ckpt, model, step=10, epoch=1)
    folder = write_hub_layout(tmp_path / "eval", pages, queries, QRELS)
    summary = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder)
    assert counts == {"queries": len(queries), "pages": len(pages)}
    ((task, reported),) = summary["benchmarks"]["local"]["tasks"].items()
    assert 0 <= reported["ndcg_at_5"] <= 1
    counts.update(queries=0, pages=0)
    capsys.readouterr()
    explicit = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder, "--quantize", "4bit")
    assert explicit["revision"] == summary["revision"] and counts == {"queries": 0, "pages": 0}
    out = capsys.readouterr().out
    assert "was trained on" not in out and "pages encoded" not in out
    assert "nothing encoded: every task's results came from mteb's result cache" in out
    plain = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder, "--quantize", "none", "--dtype", "bf16")
    assert "trained on a --quantize 4bit backbone and is loaded on a --quantize none one" in capsys.readouterr().out
    assert plain["revision"] != summary["revision"] and counts == {"queries": len(queries), "pages": len(pages)}


# -----------------------------------------------------------------------------
# Pooling and re-ranking (--pool_factor, --rerank)


def test_rerank_rescored_pages_keep_full_scores_and_rank_first():
    """similarity() with rerank: each query's top N by pooled score carry their exact full MaxSim, the others sit
    below all of them, so the order is the two-stage one."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    queries = [F.normalize(torch.randn(n, 16, generator=g), dim=-1) for n in (3, 5, 4)]
    full = [F.normalize(torch.randn(n, 16, generator=g), dim=-1) for n in (12, 30, 7, 21, 16, 9)]
    encoder = cmteb.ColInternEncoder(None, None, None, pool_factor=3, rerank=2)
    pooled = encoder._pool(full)
    assert [len(p) for p in pooled] == [4, 10, 2, 7, 5, 3]
    plain = cmteb.exact_maxsim(queries, pooled)
    exact_full = cmteb.exact_maxsim(queries, full)
    scores = encoder.similarity(queries, pooled)
    for qi in range(len(queries)):
        top = plain[qi].topk(2).indices
        rest = [j for j in range(len(full)) if j not in top.tolist()]
        torch.testing.assert_close(scores[qi, top], exact_full[qi, top])
        assert scores[qi, rest].max() < scores[qi, top].min()
        torch.testing.assert_close(scores[qi, rest], plain[qi, rest] - (2 * len(queries[qi]) + 1))
    report = encoder.index_report()
    assert (
        report["pages"] == 6 and report["vectors_per_page"] == 31 / 6 and report["vectors_per_page_unpooled"] == 95 / 6
    )
    assert report["page_index_bytes"] == 31 * 16 * 4 and report["full_bytes"] == 95 * 16 * 4
    assert report["full_vectors_kept"] == "in memory"
    # without rerank the full vectors are not kept
    plain_encoder = cmteb.ColInternEncoder(None, None, None, pool_factor=3)
    plain_encoder._pool(full)
    assert plain_encoder.full_pages == {}
    torch.testing.assert_close(plain_encoder.similarity(queries, plain_encoder._pool(full)), plain)


def test_pooled_and_reranked_eval_match_independent_computation_and_key_results(
    tmp_path, pages, queries, trained, counts
):
    import colintern_scoring as cs

    model, processor, ckpt = trained
    folder = write_hub_layout(tmp_path / "eval", pages, queries, QRELS)
    lengths = [len(p) for p in model.encode_pages(processor, pages)]
    base = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder)
    assert base["page_index"]["pool_factor"] == 1 and base["page_index"]["vectors_per_page"] == sum(lengths) / 10
    revisions = {base["revision"]}
    for flags, rerank in ((["--pool_factor", "4"], 0), (["--pool_factor", "4", "--rerank", "3"], 3)):
        counts.update(queries=0, pages=0)
        summary = run_eval(tmp_path, "--ckpt", ckpt, "--local_task", folder, *flags)
        assert counts == {"queries": len(queries), "pages": len(pages)}  # its own result key: evaluated afresh
        revisions.add(summary["revision"])
        ((task, reported),) = summary["benchmarks"]["local"]["tasks"].items()
        expected = independent_metrics(
            model, processor, queries, pages, QRELS, pool=lambda p: cs.pool_page(p, 4), rerank=rerank
        )
        for metric, value in expected.items():
            assert reported[metric] == pytest.approx(value, abs=1e-5), (flags, metric)
        index = summary["page_index"]
        assert (index["pool_factor"], index["rerank"], index["pages"]) == (4, rerank, len(pages))
        assert index["vectors_per_page"] == sum(max(1, n // 4) for n in lengths) / len(pages)
        assert index["page_index_bytes"] == sum(max(1, n // 4) for n in lengths) * 32 * 4
        assert index["full_vectors_kept"] == ("in memory" if rerank else "no")
    assert len(revisions) == 3


def test_pool_and_rerank_flags_are_checked(capsys):
    ok = ["--model_id", "x", "--local_task", "x"]
    args = colintern_eval.parse_args(ok)
    assert (args.pool_factor, args.rerank) == (1, 0)
    for flags, message in (
        (["--pool_factor", "0"], "--pool_factor must be >= 1"),
        (["--rerank", "-1"], "--rerank must be >= 0"),
        (["--rerank", "5"], "pass --pool_factor > 1"),
    ):
        with pytest.raises(SystemExit):
            colintern_eval.parse_args(ok + flags)
        assert message in capsys.readouterr().err


def test_a_task_failing_on_one_rank_counts_as_failed_on_every_rank(monkeypatch, capsys):
    """agree_on_task under torchrun, each rank's view (the gather of every rank's error, None for success, stands in
    for the collective, which tests/test_distributed.py runs for real): the ranks that succeeded record the failing
    rank's error and all move on together; a task that succeeded everywhere stays a success."""

    def gathered(errors):
        monkeypatch.setattr(colintern_eval, "gather_to_all", lambda items, world: list(errors))

    gathered([None, "CUDA out of memory"])
    failed = {}  # rank 0: the task ran fine here
    assert colintern_eval.agree_on_task("DocVQA", failed, world=2) is False
    assert failed == {"DocVQA": "rank 1: CUDA out of memory"}
    assert "task DocVQA failed on rank 1 (CUDA out of memory); going on with the other tasks" in capsys.readouterr().out
    failed = {"DocVQA": "CUDA out of memory"}  # rank 1 keeps its own message
    assert colintern_eval.agree_on_task("DocVQA", failed, world=2) is False
    assert failed == {"DocVQA": "CUDA out of memory"} and capsys.readouterr().out == ""
    gathered([None, None])
    failed = {"Other": "earlier"}
    assert colintern_eval.agree_on_task("DocVQA", failed, world=2) is True and failed == {"Other": "earlier"}


def test_the_model_meta_loader_rebuilds_the_same_encoder(tiny_model_dir):
    """mteb builds a model from its ModelMeta as loader(name, revision, **loader_kwargs): those keywords are the
    resolved EncoderSettings, so the encoder it builds has the same result key (the same scores)."""
    encoder = cmteb.load_encoder(cmteb.EncoderSettings(model_id=tiny_model_dir, seed=3, pool_factor=2))
    meta = encoder.mteb_model_meta
    again = meta.loader(meta.name, meta.revision, **meta.loader_kwargs)
    assert again.revision_for(None) == encoder.revision_for(None)
    other = cmteb.load_encoder(cmteb.EncoderSettings(model_id=tiny_model_dir, seed=4, pool_factor=2))
    assert other.revision_for(None) != encoder.revision_for(None)  # the key does tell encoders apart
