"""export.py: the hub-ready folder, loading it back (folder, hub id, peft), eval.py on it, and refusing bad folders."""

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_eval import QRELS, run_eval, write_hub_layout

import colintern_checkpoint as ck
import colintern_model as cm
import colintern_mteb as cmteb
import colintern_scoring as cs
import eval as colintern_eval
import export
from make_synthetic_data import render_keyword_page

NAME = "me/colintern-tiny"
LOCAL_SOURCE = "/data/private-pages"  # lineage that is no hub dataset: kept out of the card's datasets
QUERIES = ["Which page is about alpha?", "beta gamma"]


@pytest.fixture(scope="module")
def pages():
    return [render_keyword_page("alpha"), render_keyword_page("beta", size=(448, 224))]


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    """A .pt whose LoRA B matrices are non-zero (LoRA changes the embeddings), with a lineage."""
    torch.manual_seed(1)
    model, _ = cm.ColIntern.from_pretrained(tiny_model_dir, proj_dim=16, lora=cm.LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path = str(tmp_path_factory.mktemp("run") / "colintern_heads_epoch2.pt")
    cm.save_checkpoint(path, model, step=20, epoch=2, training_data=["vidore/colpali_train_set", LOCAL_SOURCE])
    return path


# Where sentence-transformers and ColIntern encode the same inputs (tests/test_sentence_transformers.py, mteb below)
# they batch them differently: ColIntern pages 4 at a time in input order, sentence-transformers 32 at a time longest
# first, so sequences are padded to other lengths and attention and matmuls sum in another order. Each output of a
# layer sums at most N = 400 products (the longest sequence: 5 tiles x 64 tokens + the prompt; the matmuls are
# narrower), in fp32 each reordering moves it by at most N u (u = 2^-24) of the unit vectors the tiny model's 3
# layers (vision 1, language 2) end in: per component, |difference| <= 3 N u.
VECTOR_TOL = 3 * 400 * 2.0**-24


def score_tol(query_tokens: int, dim: int) -> float:
    """A similarity q.p of unit vectors each off by <= VECTOR_TOL per component moves by <= 2 sqrt(dim) VECTOR_TOL
    (Cauchy-Schwarz); a max is 1-Lipschitz; a score sums query_tokens of them. Each side's own fp32 scoring adds its
    rounding (cs.score_error_bound)."""
    return query_tokens * 2 * dim**0.5 * VECTOR_TOL + 2 * cs.score_error_bound(torch.float32, query_tokens, dim)


def run_export(*flags):
    return export.main(export.parse_args([str(f) for f in flags]))


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory):
    return run_export(
        "--ckpt", checkpoint, "--out_dir", tmp_path_factory.mktemp("exp") / "colintern-tiny", "--name", NAME
    )


def encodings(path, pages, **kwargs):
    model, processor = cm.load_trained(path, **kwargs)
    return model.encode_queries(processor, QUERIES) + model.encode_pages(processor, pages)


def test_folder_holds_safetensors_and_json_and_encodes_as_the_checkpoint(folder, checkpoint, pages, monkeypatch):
    assert sorted(os.listdir(folder)) == [
        "1_Router",
        "2_Normalize",
        "3_MultiVectorMask",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "colintern_config.json",
        "config_sentence_transformers.json",
        "heads.safetensors",
        "modules.json",
        "mteb_model_meta.py",
        "processor_config.json",
        "sentence_bert_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [n for n in os.listdir(os.path.dirname(folder)) if n.startswith(".")]  # no temp folder left
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert not f.read(2).startswith((b"PK", b"\x80")), name  # no zip (torch.save) or pickle inside
            assert name.endswith((".json", ".safetensors", ".jinja", ".md")) or name == "mteb_model_meta.py", name
    config = json.load(open(os.path.join(folder, "colintern_config.json")))
    meta = ck.load_checkpoint(checkpoint)["meta"]
    assert config == {"kind": "colintern", "export_version": 1, "name": NAME, **meta}  # the whole meta travels
    adapter = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert adapter["base_model_name_or_path"] == meta["model_id"] and adapter["peft_type"] == "LORA"
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8

    expected = encodings(checkpoint, pages)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **kw: folder)  # the hub id's download
    for got in (encodings(folder, pages), encodings(NAME, pages)):
        assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, expected))
    identities = [cm.load_trained(path)[0].embedding_identity() for path in (NAME, folder, checkpoint)]
    assert identities[0] == identities[1] == identities[2]  # the same weights, whichever form: one cache key


def test_peft_loads_the_adapter_itself(folder, checkpoint, tiny_model_dir):
    from peft import PeftModel, get_peft_model_state_dict

    peft_model = PeftModel.from_pretrained(cm.load_backbone(tiny_model_dir), folder)
    loaded = get_peft_model_state_dict(peft_model)
    lora = ck.load_checkpoint(checkpoint)["lora"]
    assert len(loaded) == len(lora) == 28
    for key, value in lora.items():
        assert torch.equal(loaded[ck.PEFT_KEY_PREFIX + key], value), key


def test_model_card_and_mteb_registration(folder):
    card = open(os.path.join(folder, "README.md")).read()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "sentence-transformers" and front["license"] == "other"
    assert {"colpali", "late-interaction", "visual-document-retrieval", "vidore"} <= set(front["tags"])
    assert front["datasets"] == ["vidore/colpali_train_set"] and LOCAL_SOURCE not in card
    assert card.index(f'MultiVectorEncoder("{NAME}")') < card.index(f'load_trained("{NAME}")')  # ST first

    namespace = {}
    exec(open(os.path.join(folder, "mteb_model_meta.py")).read(), namespace)
    meta = namespace["colintern_tiny"]
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.models.sentence_transformer_wrapper import MultiVectorWrapper

    assert isinstance(meta, ModelMeta) and meta.name == NAME and meta.loader is MultiVectorWrapper
    assert meta.loader_kwargs == {} and meta.embed_dim == 16 and "Sentence Transformers" in meta.framework
    imports = [line for line in open(os.path.join(folder, "mteb_model_meta.py")) if line.startswith(("from", "import"))]
    assert [line.split()[1] for line in imports] == [
        "mteb.models.model_meta",
        "mteb.models.sentence_transformer_wrapper",
    ]
    assert meta.similarity_fn_name == ScoringFunction.MAX_SIM and meta.model_type == ["late-interaction"]
    assert meta.training_datasets == cmteb.MTEB_TRAINING_DATASETS["vidore/colpali_train_set"]


def test_eval_of_the_folder_equals_the_checkpoint_and_the_card_shows_it(
    tmp_path, folder, checkpoint, pages, monkeypatch
):
    eval_pages = [render_keyword_page(w, variant=i) for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 3)]
    queries = [f"Which page is about {w}?" for w in ["alpha", "beta", "gamma", "delta"] * 2]
    task = write_hub_layout(tmp_path / "eval", eval_pages[:10], queries, QRELS)
    from_pt = run_eval(tmp_path / "pt", "--ckpt", checkpoint, "--local_task", task)
    from_folder = run_eval(tmp_path / "folder", "--ckpt", folder, "--local_task", task)
    assert from_folder["benchmarks"] == from_pt["benchmarks"] and from_folder["revision"] != from_pt["revision"]
    assert (
        cmteb.load_encoder(cmteb.EncoderSettings(ckpt=folder)).mteb_model_meta.name == NAME
    )  # reported under its name

    # mteb through the registration (MultiVectorWrapper): eval.py's scores within score_tol, so its rankings but for
    # near-ties, and then its metrics
    ((task_name, eval_metrics),) = from_folder["benchmarks"]["local"]["tasks"].items()
    eval_scores = predictions(
        tmp_path
        / "folder"
        / "out_predictions"
        / from_folder["task_revisions"][task_name]
        / f"{task_name}_predictions.json"
    )
    model, mteb_scores, mteb_metrics = evaluate_through_the_registration(folder, task, tmp_path, monkeypatch)
    tolerance = score_tol(max(len(q) for q in model.model.encode_query(queries)), 16)
    assert mteb_scores.keys() == eval_scores.keys() and len(eval_scores) == len(queries)
    near_ties = False
    for query, scores in eval_scores.items():
        assert mteb_scores[query].keys() == scores.keys() and len(scores) == 10
        assert max(abs(mteb_scores[query][page] - s) for page, s in scores.items()) <= tolerance, query
        order = ranking(scores)
        if ranking(mteb_scores[query]) != order:  # only pages within the tolerance of each other may swap
            assert min(scores[a] - scores[b] for a, b in zip(order, order[1:])) <= 2 * tolerance, query
            near_ties = True
    if not near_ties:  # the same rankings: mteb's metric code gives the same metrics
        for metric in cmteb.METRICS:
            assert mteb_metrics[metric] == pytest.approx(eval_metrics[metric], abs=1e-5), metric
    monkeypatch.chdir(tmp_path)

    with open(tmp_path / "summary.json", "w") as f:
        json.dump(from_pt, f)
    again = run_export(
        "--ckpt",
        checkpoint,
        "--out_dir",
        folder,
        "--name",
        NAME,
        "--eval_json",
        tmp_path / "summary.json",
        "--license",
        "mit",
        "--overwrite",
    )
    card = open(os.path.join(again, "README.md")).read()
    ndcg = 100 * from_pt["benchmarks"]["local"]["average"]["ndcg_at_5"]
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "mit" and f"| {ndcg:.2f} |" in card


def predictions(path) -> dict:
    """An mteb predictions file -> {query id: {page id: score}}."""
    with open(path) as f:
        return json.load(f)["default"]["test"]


def ranking(scores: dict) -> list:
    return sorted(scores, key=lambda page: -scores[page])


def evaluate_through_the_registration(folder, task_folder, tmp_path, monkeypatch):
    """The folder's mteb registration, loaded as mteb loads it: through mteb's MultiVectorWrapper (sentence-
    transformers), not eval.py -> (the loaded model, mteb's scores {query: {page: score}}, its metrics)."""
    import mteb
    from mteb.models.sentence_transformer_wrapper import MultiVectorWrapper

    os.makedirs(tmp_path / "hub" / os.path.dirname(NAME))
    os.symlink(folder, tmp_path / "hub" / NAME)  # the hub id names the folder: a local path of that name comes first
    monkeypatch.chdir(tmp_path / "hub")
    namespace = {}
    exec(open(os.path.join(folder, "mteb_model_meta.py")).read(), namespace)
    model = namespace["colintern_tiny"].load_model(device="cpu")
    assert isinstance(model, MultiVectorWrapper) and model.mteb_model_meta.modalities == ["image", "text"]
    task = cmteb.make_local_task(task_folder)
    result = mteb.evaluate(
        model,
        task,
        cache=None,
        prediction_folder=str(tmp_path / "mteb"),
        co2_tracker=False,
        encode_kwargs={"batch_size": 4, "show_progress_bar": False},
    )
    return model, predictions(tmp_path / "mteb" / task.prediction_file_name), result.task_results[0].scores["test"][0]


def test_mining_with_the_folder_writes_what_the_checkpoint_mines(tmp_path, folder, checkpoint):
    """mine_hard_negatives.py --ckpt takes an exported folder as eval does (the one shared flag): the same JSONL as
    the .pt it came from, the stats naming the folder, and the .pt's page cache reused (both are the same weights:
    the cache is keyed by the embeddings' identity, not by the file)."""
    import mine_hard_negatives as mine

    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    for i, w in enumerate(words):
        render_keyword_page(w, variant=i).save(tmp_path / f"{w}.png")
    with open(tmp_path / "t.jsonl", "w") as f:
        for w in words:
            f.write(json.dumps({"query": f"Which page is about {w}?", "pos": f"{w}.png", "negs": []}) + "\n")
    mined = {}
    for name, ckpt in (("pt", checkpoint), ("folder", folder)):
        out = tmp_path / f"{name}.jsonl"
        stats = mine.main(
            mine.parse_args(
                [
                    "--ckpt",
                    ckpt,
                    "--train_jsonl",
                    str(tmp_path / "t.jsonl"),
                    "--root",
                    str(tmp_path),
                    "--out_jsonl",
                    str(out),
                    "--k",
                    "2",
                    "--num_workers",
                    "0",
                    "--device",
                    "cpu",
                    "--margin",
                    "inf",
                ]
            )
        )
        assert stats["ckpt"] == os.path.abspath(ckpt)
        mined[name] = (out.read_bytes(), stats["cache"]["dir"], stats["cache"]["reused"])
    assert mined["folder"][0] == mined["pt"][0] and mined["folder"][1] == mined["pt"][1]
    assert (mined["pt"][2], mined["folder"][2]) == (0, 1)


def test_a_bidirectional_checkpoint_is_refused_in_one_line(checkpoint, tmp_path):
    """sentence-transformers' Transformer module would run the language model causally: refused, nothing written."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["meta"]["bidirectional"] = True
    torch.save(ckpt, tmp_path / "both.pt")
    with pytest.raises(ValueError, match="was trained with --bidirectional.*cannot be exported yet"):
        run_export("--ckpt", tmp_path / "both.pt", "--out_dir", tmp_path / "out", "--name", NAME)
    assert not os.path.exists(tmp_path / "out")


def test_out_dir_is_not_overwritten_by_accident(checkpoint, folder, tmp_path):
    with pytest.raises(FileExistsError, match="exists and is not empty: pass --overwrite"):
        run_export("--ckpt", checkpoint, "--out_dir", folder)
    with pytest.raises(ValueError, match="mteb registration is not valid.*--license"):
        run_export("--ckpt", checkpoint, "--out_dir", tmp_path / "x", "--license", "my-own")
    assert os.listdir(tmp_path) == []  # the failed export left nothing behind


def test_a_folder_edit_that_changes_no_embedding_keeps_the_fingerprint(folder, tmp_path):
    def identity():
        return cm.load_trained(str(copy))[0].embedding_identity()

    copy = shutil.copytree(folder, tmp_path / "copy")
    before = identity()
    with open(copy / "README.md", "a") as f:
        f.write("more words\n")
    assert identity() == before
    heads = load_file(copy / "heads.safetensors")
    heads["page_head.bias"] += 1
    save_file(heads, copy / "heads.safetensors")
    assert identity() != before


def broken(folder, tmp_path, how):
    copy = shutil.copytree(folder, tmp_path / "broken")
    how(copy)
    return str(copy)


def truncate(copy):
    with open(copy / "heads.safetensors", "r+b") as f:
        f.truncate(100)


def other_hidden_size(copy):
    heads = load_file(copy / "heads.safetensors")
    save_file(
        {k: torch.zeros(16, 32) if k.endswith("weight") else v for k, v in heads.items()}, copy / "heads.safetensors"
    )


def other_rank(copy):
    config = json.load(open(copy / "adapter_config.json"))
    json.dump(dict(config, r=8), open(copy / "adapter_config.json", "w"))


def other_targets(copy):
    """A consistent folder whose adapter wraps q_proj only: the model built from it has no place for the rest."""
    weights = load_file(copy / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "q_proj" in k or "k_proj" in k}, copy / "adapter_model.safetensors")


def wider_lora(copy):
    weights = load_file(copy / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else v for k, v in weights.items()},
        copy / "adapter_model.safetensors",
    )


@pytest.mark.parametrize(
    "how, error",
    [
        (truncate, r"heads.safetensors cannot be read as safetensors .*: the file is corrupted"),
        (other_hidden_size, r"heads do not fit the backbone .*query_head holds"),
        (other_rank, r"adapter_config.json does not match colintern_config.json: the adapter is LORA \{'r': 8"),
        (other_targets, r"LoRA layout does not match the model: 0 checkpoint keys have no place"),
        (wider_lora, r"LoRA adapter does not fit the backbone .*: 14 tensors have other shapes"),
        (lambda copy: os.remove(copy / "colintern_config.json"), r"colintern_config.json is missing"),
    ],
    ids=[
        "truncated_heads",
        "heads_of_another_hidden_size",
        "adapter_config_disagrees",
        "adapter_of_other_modules",
        "adapter_of_another_width",
        "no_config",
    ],
)
def test_corrupted_or_mismatched_folder_is_refused_in_one_line(folder, tmp_path, how, error):
    bad = broken(folder, tmp_path, how)
    with pytest.raises((ValueError, FileNotFoundError), match=error) as info:
        cm.load_trained(bad)
    assert "\n" not in str(info.value)


def test_hub_id_that_cannot_be_downloaded_is_one_line(monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(
        FileNotFoundError, match=r"nobody/nothing is no local file or folder.*Offline: .*hf download"
    ) as info:
        ck.load_checkpoint("nobody/nothing")
    assert "\n" not in str(info.value)
    assert colintern_eval.parse_args(["--ckpt", "nobody/nothing", "--local_task", "x"]).ckpt == "nobody/nothing"


def test_train_warm_starts_from_the_folder_exactly_as_from_the_checkpoint(folder, checkpoint, tiny_model_dir, tmp_path):
    """train.py --resume_ckpt takes the exported folder: two seeded steps from it give the weights two steps from the
    .pt give, bit for bit (the same tensors loaded, then the same ops in the same order)."""
    from test_train import save_hub_folder

    import train

    hub = save_hub_folder(tmp_path / "hub", ["alpha", "beta", "gamma", "delta"])
    results = {}
    for name, start in (("pt", checkpoint), ("folder", folder)):
        out = tmp_path / name
        train.main(
            train.parse_args(
                [
                    str(f)
                    for f in (
                        "--model_id",
                        tiny_model_dir,
                        "--train_hub",
                        hub,
                        "--out_dir",
                        out,
                        "--resume_ckpt",
                        start,
                        "--batch_size",
                        2,
                        "--epochs",
                        1,
                        "--optimizer",
                        "adamw",
                        "--num_workers",
                        0,
                        "--lr",
                        1e-3,
                    )
                ]
            )
        )
        results[name] = ck.load_checkpoint(str(out / "colintern_heads_epoch3.pt"))
    assert results["pt"]["meta"]["step"] == results["folder"]["meta"]["step"] == 20 + 2
    for part in ("heads", "lora"):
        assert results["pt"][part].keys() == results["folder"][part].keys()
        for key, value in results["pt"][part].items():
            assert torch.equal(value, results["folder"][part][key]), key
    # and training moved the weights (the comparison is not between two copies of the start)
    start = ck.load_checkpoint(checkpoint)
    assert any(not torch.equal(v, results["pt"]["heads"][k]) for k, v in start["heads"].items())
