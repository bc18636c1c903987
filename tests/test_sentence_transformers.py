"""An exported folder in sentence-transformers (colintern_st.py, export.py): MultiVectorEncoder encodes and scores as
ColIntern does with sentence-transformers' own modules, inputs ColIntern does not encode are refused, the model card's
snippets run as written, and nothing of this repository is imported on the way. (mteb's MultiVectorWrapper against
eval.py: tests/test_export.py.)"""

import os
import re
import shutil
import sys

import pytest
import torch
from conftest import ROOT
from PIL import Image

# fixtures: a .pt whose LoRA changes the embeddings, and its export
from test_export import NAME, VECTOR_TOL, checkpoint, folder, score_tol  # noqa: F401

import colintern_checkpoint as ck
import colintern_model as cm
import colintern_scoring as cs
import colintern_st
from make_synthetic_data import render_keyword_page

# Non-Latin text too: the chat template must pass any text through unchanged (and template syntax as text)
QUERIES = ["Which page is about alpha?", "beta", "Какая страница про гамму?", "ページ 日本語 {{ delta }}"]
# 1 tile; 2 tiles + a thumbnail; 2x2 tiles + a thumbnail: at max_tiles 4 (the checkpoint's), where the image
# processor's own default (12) would cut 3x3; a grey-scale page (converted to RGB on both sides)
PAGE_SIZES = [(224, 224), (448, 224), (672, 672), (224, 448)]
TILES = [1, 3, 5, 3]
TILE_TOKENS = 64  # the tiny model's 224 px tile


@pytest.fixture(scope="module")
def pages():
    out = [
        render_keyword_page(w, size=s, variant=i)
        for i, (w, s) in enumerate(zip(["alpha", "beta", "gamma", "x"], PAGE_SIZES))
    ]
    out[3] = out[3].convert("L")
    return out


@pytest.fixture(scope="module")
def st_model(folder):  # noqa: F811
    from sentence_transformers import MultiVectorEncoder

    return MultiVectorEncoder(folder, local_files_only=True, device="cpu")


@pytest.fixture(scope="module")
def colintern(checkpoint):  # noqa: F811
    return cm.load_trained(checkpoint)


def test_multivector_encoder_encodes_and_scores_as_colintern(st_model, colintern, pages):
    """sentence-transformers' own modules, no custom one; as many vectors per query (every token) and per page (its
    image tokens: 64 a tile, max_tiles applied) as ColIntern gives, the vectors within VECTOR_TOL, the scores within
    score_tol."""
    from sentence_transformers.base.modules import Dense, Normalize, Router, Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    assert [type(m) for m in st_model] == [Transformer, Router, Normalize, MultiVectorMask]  # ST's own modules only
    assert {type(m) for route in st_model[1].sub_modules.values() for m in route} == {Dense}
    model, processor = colintern
    queries = st_model.encode_query(QUERIES)
    st_pages = st_model.encode_document(pages)
    ours_queries = model.encode_queries(processor, QUERIES)
    ours_pages = model.encode_pages(processor, pages)

    expected_query_tokens = [len(processor.process_queries([q])["input_ids"][0]) for q in QUERIES]  # every token
    assert [len(q) for q in queries] == [len(q) for q in ours_queries] == expected_query_tokens
    assert [len(p) for p in st_pages] == [len(p) for p in ours_pages] == [TILE_TOKENS * t for t in TILES]
    for got, expected in zip(queries + st_pages, ours_queries + ours_pages):
        torch.testing.assert_close(got.cpu(), expected, atol=VECTOR_TOL, rtol=0)

    scores = st_model.similarity(queries, st_pages).cpu()
    expected = cs.maxsim_scores(ours_queries, ours_pages)
    assert scores.shape == (len(QUERIES), len(pages))
    for i, q in enumerate(ours_queries):
        torch.testing.assert_close(scores[i], expected[i], atol=score_tol(len(q), model.proj_dim), rtol=0)


def test_over_a_bf16_backbone_they_agree_to_bf16_rounding(folder, checkpoint, pages):  # noqa: F811
    """What a GPU user gets (both load the backbone in bf16 there; sentence-transformers does on a CPU too, from the
    checkpoint's config): ColIntern runs LoRA and the heads under autocast, which keeps some ops (softmax, norms) in
    fp32, and normalises in fp32; sentence-transformers runs the same weights in plain bf16 and normalises in bf16.
    So each of the 3 layers may round once more to bf16 (unit roundoff u = 2^-8, relative to unit-scale values), and
    the head's output and the normalised vector once each: per component |difference| <= (3 + 2) u."""
    from sentence_transformers import MultiVectorEncoder

    model = MultiVectorEncoder(folder, local_files_only=True, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    ours, processor = cm.load_trained(checkpoint, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and ours.compute_dtype == torch.bfloat16
    got = model.encode_query(QUERIES) + model.encode_document(pages[:2])  # 1 tile and 3: bf16 is slow on a CPU
    expected = ours.encode_queries(processor, QUERIES) + ours.encode_pages(processor, pages[:2])
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e, atol=5 * 2.0**-8, rtol=0)


def test_the_lora_adapter_is_loaded_onto_the_backbone(st_model, checkpoint):  # noqa: F811
    """transformers loads the adapter through peft (peft < 0.20 drops every weight with only a log line): every LoRA
    tensor of the checkpoint is in the backbone, under peft's default adapter name."""
    lora = ck.load_checkpoint(checkpoint)["lora"]
    loaded = {
        name.replace(".default.", "."): p for name, p in st_model[0].auto_model.named_parameters() if "lora_" in name
    }
    assert loaded.keys() == lora.keys()
    for key, value in lora.items():
        assert torch.equal(loaded[key].detach().cpu(), value), key


def test_inputs_colintern_does_not_encode_are_refused(st_model, pages):
    """The chat template refuses what ColIntern never encoded (its message), rather than encoding something else."""
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="ColIntern encodes a query as one text .* got text for task document"):
        st_model.encode_document(["a page as text"])
    with pytest.raises(TemplateError, match="got image for task query"):
        st_model.encode_query([pages[0]])
    with pytest.raises(TemplateError, match="got text, text for task query"):
        st_model.encode_query(["beta"], prompt="a prompt ColIntern never saw: ")


def test_a_folder_whose_chat_template_is_not_colintern_s_is_refused(folder, tmp_path, colintern):  # noqa: F811
    """export.py's check (check_formats) reads the written template back: one pad token short is refused."""
    copy = shutil.copytree(folder, tmp_path / "edited")
    template = (copy / "chat_template.jinja").read_text()
    (copy / "chat_template.jinja").write_text(template.replace("<|endoftext|>", "", 1))  # 9 pad tokens
    colintern_st.check_formats(folder, colintern[1])
    with pytest.raises(ValueError, match=r"chat_template.jinja renders \{'query'"):
        colintern_st.check_formats(str(copy), colintern[1])


def card_snippets(path) -> list:
    card = open(os.path.join(path, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def repository_modules() -> list:
    """The module names of this repository's top-level files (colintern_model, eval, export, train, ...)."""
    return sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))


def test_model_card_snippets_run_as_written(folder, tmp_path, monkeypatch, colintern):  # noqa: F811
    """Both python blocks of the card, as written, against the folder under its hub id's name (a local folder of that
    name comes first): the sentence-transformers one, and the mteb registration, with every module of this repository
    made unimportable; then ColIntern's. Each gives the scores ColIntern computes."""
    from mteb.models.sentence_transformer_wrapper import MultiVectorWrapper

    st_snippet, colintern_snippet = card_snippets(folder)
    assert st_snippet.index("MultiVectorEncoder(") < st_snippet.index("encode_query") < st_snippet.index("similarity")
    os.makedirs(tmp_path / os.path.dirname(NAME))
    os.symlink(folder, tmp_path / NAME)
    render_keyword_page("revenue", size=(448, 224)).save(tmp_path / "page.png")
    model, processor = colintern
    query = re.search(r'encode_query\(\["(.*?)"\]\)', st_snippet)[1]
    expected = cs.maxsim_scores(
        model.encode_queries(processor, [query]), model.encode_pages(processor, [Image.open(tmp_path / "page.png")])
    )
    tolerance = score_tol(len(processor.process_queries([query])["input_ids"][0]), model.proj_dim)
    monkeypatch.chdir(tmp_path)

    with monkeypatch.context() as blocked:
        for name in repository_modules():
            blocked.setitem(sys.modules, name, None)  # `import eval` (or any of ours) now raises ImportError
        with pytest.raises(ImportError):
            import eval  # noqa: F401, F811
        namespace = {}
        exec(st_snippet, namespace)
        torch.testing.assert_close(namespace["scores"].cpu(), expected, atol=tolerance, rtol=0)
        registration = {}
        exec(open(os.path.join(NAME, "mteb_model_meta.py")).read(), registration)
        registered = registration["colintern_tiny"].load_model(device="cpu")
        assert isinstance(registered, MultiVectorWrapper)
        again = registered.model.similarity(
            registered.model.encode_query([query]), registered.model.encode_document([Image.open("page.png")])
        )
        torch.testing.assert_close(again.cpu(), expected, atol=tolerance, rtol=0)

    namespace = {}
    exec(colintern_snippet, namespace)  # ROOT is on sys.path here (conftest), as the card asks
    assert torch.equal(namespace["scores"], expected)


def test_export_at_a_matryoshka_prefix_encodes_it_everywhere(checkpoint, tmp_path, pages):  # noqa: F811
    """export.py --dim 8 of a checkpoint trained at (16, 8): the folder is a model of size 8, whose vectors (ours
    and sentence-transformers') are ColIntern(dim=8)'s, the renormalised prefixes: the same products as the full
    head's first 8 rows, within fp32 rounding of a 64-long dot (~1e-6 on unit vectors). An untrained size is one
    line."""
    from sentence_transformers import MultiVectorEncoder

    import export

    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["meta"]["matryoshka_dims"] = [16, 8]
    torch.save(ckpt, tmp_path / "mrl.pt")
    d8 = export.main(
        export.parse_args(["--ckpt", str(tmp_path / "mrl.pt"), "--out_dir", str(tmp_path / "d8"), "--dim", "8"])
    )
    reference, processor, _ = cm.ColIntern.from_checkpoint(str(tmp_path / "mrl.pt"), dim=8)
    expected = reference.encode_pages(processor, pages[:2])
    ours_model, ours_processor = cm.load_trained(d8)
    assert ours_model.proj_dim == ours_model.dim == 8
    st = MultiVectorEncoder(d8, local_files_only=True, device="cpu").encode_document(pages[:2])
    for e, o, s in zip(expected, ours_model.encode_pages(ours_processor, pages[:2]), st):
        assert e.shape[1] == 8 and torch.allclose(e, o, atol=1e-5)
        assert torch.allclose(e, torch.as_tensor(s).float(), atol=1e-5)
    with pytest.raises(ValueError, match="--dim 4: --ckpt .* was trained at 16, 8"):
        export.main(
            export.parse_args(["--ckpt", str(tmp_path / "mrl.pt"), "--out_dir", str(tmp_path / "d4"), "--dim", "4"])
        )
