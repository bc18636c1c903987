"""search.py through its entry (main(parse_args([...]))) on the tiny model and keyword pages saved as PDFs, PNG,
JPEG and a multi-page TIFF: stored vectors against the model's own encoder on independently rendered pages, search
results against a float64 MaxSim of the stored vectors, the store's incremental and resumable behaviour, bad
inputs, --html escaping (and a real browser's screenshot where Debian's chromium is installed), and the Qdrant path
(qdrant-client's local mode) against the local index."""

import os
import shutil
import subprocess
import sys
import weakref

import pytest
import test_mine
import torch
from conftest import ROOT, query

import search
from colintern_cli import UserFileNotFoundError, UserValueError
from colintern_model import ColIntern
from make_synthetic_data import WORDS, render_keyword_page

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# fp16 storage: a unit vector's entries are rounded with relative error <= 2^-11, so each is off by <= 2^-11
FP16_ENTRY = 2.0**-11


def run(*flags):
    return search.main(search.parse_args([str(f) for f in flags]))


def save_pdf(path, images):
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72)


ckpt = test_mine.ckpt  # module fixture: an untrained checkpoint (seeded heads, LoRA), one tile a page


@pytest.fixture(scope="module")
def model(ckpt):
    model, processor, _ = ColIntern.from_checkpoint(ckpt)
    return model.eval(), processor


def make_docs(folder):
    """7 good pages in 4 documents (a nested folder too) and one file of each bad kind -> the bad names."""
    import pypdf

    os.makedirs(folder / "sub" / "deep")
    save_pdf(folder / "report.pdf", [render_keyword_page(w) for w in WORDS[0:3]])
    render_keyword_page(WORDS[3]).save(folder / "sub" / "photo.png")
    render_keyword_page(WORDS[4]).save(folder / "sub" / "deep" / "photo.jpg", quality=95)
    frames = [render_keyword_page(w) for w in WORDS[5:7]]
    frames[0].save(folder / "scan.tiff", save_all=True, append_images=frames[1:])
    (folder / "notes.txt").write_text("not a document: left out of a folder walk")
    writer = pypdf.PdfWriter(clone_from=str(folder / "report.pdf"))
    writer.encrypt("secret")
    writer.write(str(folder / "locked.pdf"))
    (folder / "truncated.pdf").write_bytes((folder / "report.pdf").read_bytes()[:300])
    pypdf.PdfWriter().write(str(folder / "empty.pdf"))
    (folder / "fake.pdf").write_text("hello, I am text")
    (folder / "garbage.png").write_bytes(b"\x89PNG not really")
    os.symlink(folder / "nowhere.pdf", folder / "gone.pdf")  # unreadable (as root a chmod 000 file is readable)
    return ["locked.pdf", "truncated.pdf", "empty.pdf", "fake.pdf", "garbage.png", "gone.pdf"]


@pytest.fixture(scope="module")
def built(ckpt, tmp_path_factory):
    """An unpooled index of the documents, built once: (docs folder, index folder, summary, printed lines)."""
    base = tmp_path_factory.mktemp("search")
    bad = make_docs(base / "docs")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run(
            "index", "--ckpt", ckpt, "--docs", base / "docs", "--index", base / "index", "--dpi", 72, "--device", "cpu"
        )
    return {
        "docs": base / "docs",
        "index": str(base / "index"),
        "summary": summary,
        "bad": bad,
        "printed": out.getvalue().splitlines(),
    }


def stored_pages(index):
    """{(path, page): full fp16 vectors} read from the store's chunk files."""
    _, catalog = search.open_index(index)
    vectors = search.load_index_vectors(index, [(p, r["sha256"]) for p, r in catalog["documents"].items()])
    return dict(zip(vectors.refs, vectors.full)), vectors


def maxsim64(q, p):
    return float((q.double() @ p.double().T).amax(dim=1).sum())


def test_bad_inputs_are_named_once_and_skipped(built):
    skipped = [line for line in built["printed"] if line.startswith("skipped ")]
    for name in built["bad"]:
        assert sum(name in line for line in skipped) == 1, (name, skipped)
    assert len(skipped) == len(built["bad"])
    reasons = {name: next(line for line in skipped if name in line) for name in built["bad"]}
    assert "encrypted" in reasons["locked.pdf"] and "no pages" in reasons["empty.pdf"]
    s = built["summary"]
    assert (s["documents"], s["pages"], s["documents_skipped"]) == (4, 7, 6)


def test_pages_are_stored_by_document_and_page_as_the_model_encodes_them(built, model):
    """Each (file, 1-based page) holds the model's vectors of that page, rendered here independently: PDFium at the
    index's dpi for the PDF, PIL's frame for the TIFF."""
    import pypdfium2 as pdfium
    from PIL import Image

    pages, _ = stored_pages(built["index"])
    docs = built["docs"]
    pdf = pdfium.PdfDocument(str(docs / "report.pdf"))
    expected = {(str(docs / "report.pdf"), n + 1): pdf[n].render(scale=1).to_pil().convert("RGB") for n in range(3)}
    tiff = Image.open(docs / "scan.tiff")
    for n in range(2):
        tiff.seek(n)
        expected[(str(docs / "scan.tiff"), n + 1)] = tiff.convert("RGB")
    expected[(str(docs / "sub" / "photo.png"), 1)] = Image.open(docs / "sub" / "photo.png").convert("RGB")
    assert set(expected) < set(pages) and len(pages) == 7
    m, processor = model
    for ref, emb in zip(expected, m.encode_pages(processor, list(expected.values()))):
        assert pages[ref].shape == emb.shape
        assert (pages[ref].float() - emb).abs().max() <= FP16_ENTRY, ref


def test_query_top_k_equals_float64_maxsim_of_the_stored_vectors(built, model):
    words = WORDS[:7]
    answers = run("query", "--index", built["index"], "--top", 4, "--device", "cpu", *map(query, words))
    pages, _ = stored_pages(built["index"])
    m, processor = model
    for a, q in zip(answers, m.encode_queries(processor, [query(w) for w in words])):
        exact = sorted(((maxsim64(q, p), ref) for ref, p in pages.items()), reverse=True)[:4]
        got = [(r["path"], r["page"]) for r in a["results"]]
        assert got == [ref for _, ref in exact]
        # fp32 sums of Lq products of unit vectors: |error| <= Lq (D + Lq) 2^-24; the printed scores are rounded to 1e-4
        for r, (score, _) in zip(a["results"], exact):
            assert abs(r["score"] - score) <= 5e-5 + q.shape[0] * (q.shape[1] + q.shape[0]) * 2.0**-24


def test_a_second_run_encodes_nothing_new_and_follows_added_changed_and_deleted_files(built, ckpt, tmp_path):
    docs, index = tmp_path / "docs", tmp_path / "index"
    shutil.copytree(built["docs"], docs, symlinks=True)
    shutil.copytree(built["index"], index)
    flags = ["--ckpt", ckpt, "--docs", docs, "--index", index, "--dpi", 72, "--device", "cpu"]
    with pytest.raises(UserValueError, match="embedding.pool_factor"):
        run("index", *flags, "--pool_factor", 2)  # the catalog's paths are the copied ones, but mixing is refused
    first = run("index", *flags)  # the copies: new paths, the same content, so nothing is encoded
    assert (first["documents"], first["documents_encoded"]) == (4, 0)
    objects = sorted(os.listdir(index / "objects"))
    again = run("index", *flags)
    assert again["documents_encoded"] == 0 and sorted(os.listdir(index / "objects")) == objects
    render_keyword_page(WORDS[8]).save(docs / "new.png")
    save_pdf(docs / "report.pdf", [render_keyword_page(w) for w in WORDS[9:11]])  # changed: 2 pages now
    os.remove(docs / "sub" / "deep" / "photo.jpg")
    s = run("index", *flags)
    assert (s["documents_encoded"], s["documents"], s["pages"], s["objects_dropped"]) == (2, 4, 6, 2)
    pages, _ = stored_pages(str(index))
    assert (str(docs / "report.pdf"), 3) not in pages and (str(docs / "new.png"), 1) in pages
    assert not any("photo.jpg" in path for path, _ in pages)
    with pytest.raises(UserValueError, match="dpi"):
        run("index", *flags[:-4], "--dpi", 96, "--device", "cpu")


def test_a_killed_run_resumes_from_its_last_chunk(ckpt, tmp_path, monkeypatch):
    """Killed while encoding page 4 of 5 (chunks of 2): the rerun encodes pages 3-5 only, and the index equals one
    built without a kill."""
    docs = tmp_path / "docs"
    docs.mkdir()
    save_pdf(docs / "long.pdf", [render_keyword_page(w, variant=i) for i, w in enumerate(WORDS[:5])])
    flags = ["--ckpt", ckpt, "--docs", docs, "--dpi", 72, "--device", "cpu", "--doc_batch", 1, "--chunk_pages", 2]
    encode, seen = ColIntern.encode_pages, []

    def killed_at_page_4(self, processor, pages, **kwargs):
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(len(pages))
        return encode(self, processor, pages, **kwargs)

    monkeypatch.setattr(ColIntern, "encode_pages", killed_at_page_4)
    with pytest.raises(KeyboardInterrupt):
        run("index", *flags, "--index", tmp_path / "killed")
    monkeypatch.setattr(
        ColIntern,
        "encode_pages",
        lambda self, processor, pages, **kw: (seen.append(len(pages)), encode(self, processor, pages, **kw))[1],
    )
    seen.clear()
    assert run("index", *flags, "--index", tmp_path / "killed")["pages"] == 5
    assert seen == [1, 1, 1]  # pages 3, 4, 5
    run("index", *flags, "--index", tmp_path / "whole")
    killed, _ = stored_pages(str(tmp_path / "killed"))
    whole, _ = stored_pages(str(tmp_path / "whole"))
    assert killed.keys() == whole.keys() and all(torch.equal(killed[k], whole[k]) for k in whole)


def test_a_thousand_page_pdf_streams_a_batch_at_a_time(tmp_path):
    """encode_document holds one --doc_batch of rendered pages: the encoder never sees more, and when it is called
    no page of an earlier batch is still alive. (A stand-in encoder: the model would take minutes.)"""
    from PIL import Image

    path = tmp_path / "long.pdf"
    save_pdf(path, [Image.new("RGB", (40, 40), (i % 256, 0, 0)) for i in range(1000)])
    doc = search.Document(str(path), "f" * 64, 0, 0, search.count_pages(str(path)))
    seen, batches = [], []

    def encode(images):
        batches.append((len(images), sum(ref() is not None for ref in seen)))
        seen.extend(weakref.ref(image) for image in images)
        return [torch.nn.functional.normalize(torch.randn(3, 8), dim=-1) for _ in images]

    class Args:
        chunk_pages, doc_batch, dpi = 64, 8, 72

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    search.encode_document(doc, str(tmp_path / "index"), encode, 1, Args, bar)
    assert doc.pages == 1000 and bar.n == 1000
    assert max(size for size, _ in batches) == 8 and max(live for _, live in batches) == 0
    assert len(os.listdir(tmp_path / "index" / "objects" / doc.sha256)) == 16 + 1  # 16 chunks + doc.json


def test_pooled_first_stage_with_a_deep_rerank_equals_the_exact_search(ckpt, built, tmp_path):
    words = WORDS[:7]
    index = tmp_path / "pooled"
    s = run(
        "index",
        "--ckpt",
        ckpt,
        "--docs",
        built["docs"],
        "--index",
        index,
        "--dpi",
        72,
        "--device",
        "cpu",
        "--pool_factor",
        2,
    )
    assert s["pooled_vectors"] == s["vectors"] // 2
    flags = ["query", "--index", index, "--top", 3, "--device", "cpu", *map(query, words)]
    exact = run(*flags, "--exact")
    assert run(*flags, "--rerank", 7) == exact  # every page reranked
    assert run(*flags) == exact  # the default depth covers these 7 pages
    assert exact == run("query", "--index", built["index"], "--top", 3, "--device", "cpu", *map(query, words))
    pooled_only = run(*flags, "--rerank", 0)
    _, vectors = stored_pages(str(index))
    q = ColIntern.from_checkpoint(ckpt)
    encoded = q[0].encode_queries(q[1], [query(w) for w in words])
    for a, qv in zip(pooled_only, encoded):
        scores = sorted((maxsim64(qv, p) for p in vectors.pooled), reverse=True)[:3]
        assert [r["score"] for r in a["results"]] == pytest.approx(scores, abs=1e-4)


def test_query_of_a_missing_or_half_written_index_is_one_line(built, tmp_path):
    with pytest.raises(UserFileNotFoundError, match="does not exist"):
        run("query", "--index", tmp_path / "none", "x")
    (tmp_path / "half").mkdir()
    shutil.copy(os.path.join(built["index"], "index.json"), tmp_path / "half")
    with pytest.raises(UserValueError, match="half-written"):
        run("query", "--index", tmp_path / "half", "x")
    result = subprocess.run(
        [sys.executable, "search.py", "query", "--index", str(tmp_path / "half"), "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "half-written" in result.stderr


@pytest.fixture(scope="module")
def hostile(ckpt, tmp_path_factory):
    """Documents whose names are markup: --html must show them as text."""
    base = tmp_path_factory.mktemp("hostile")
    docs = base / '<script>alert("x")<'
    docs.mkdir()
    render_keyword_page(WORDS[0]).save(docs / "a&b<img src=x onerror=alert(1)>.png")
    save_pdf(docs / "'quoted\".pdf", [render_keyword_page(w) for w in WORDS[1:3]])
    run("index", "--ckpt", ckpt, "--docs", docs, "--index", base / "index", "--dpi", 72, "--device", "cpu")
    html_path = base / "results.html"
    run("query", "--index", base / "index", "--top", 3, "--device", "cpu", "--html", html_path, "<b>bold?</b> & more")
    return html_path


def test_html_escapes_every_path_and_question_and_embeds_the_pages(hostile):
    text = hostile.read_text()
    assert "<script>" not in text and "<b>bold" not in text and "<img src=x" not in text
    assert "&lt;b&gt;bold?&lt;/b&gt; &amp; more" in text and "a&amp;b&lt;img src=x onerror=alert(1)&gt;.png" in text
    assert text.count('src="data:image/jpeg;base64,') == 3


def test_html_in_a_headless_browser(hostile, tmp_path):
    """The page as a person sees it: Debian's chromium takes a screenshot, which holds the thumbnails' dark text."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless browser here (Debian: apt-get install chromium)")
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,800",
            hostile.as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    image = Image.open(shot).convert("L")
    # the keyword pages are white with black words; the page's own text is small: thumbnails give large dark areas
    dark = sum(image.histogram()[:64])
    assert dark > 2000, dark


def planted_store(index, n_pages=40, tokens=30, dim=16, pool_factor=2, seed=0):
    """A store of random unit page vectors (no model) -> (pages, queries): each query is a noisy copy of 8 tokens
    of page 3 x its number, so its best page stands clear of the rest."""
    g = torch.Generator().manual_seed(seed)
    pages = [torch.nn.functional.normalize(torch.randn(tokens, dim, generator=g), dim=-1) for _ in range(n_pages)]
    images = iter(pages)
    from PIL import Image

    os.makedirs(index)
    path = os.path.join(index, "..", "planted.tiff")
    frames = [Image.new("RGB", (8, 8)) for _ in range(n_pages)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    doc = search.Document(os.path.abspath(path), "a" * 64, 0, 0, n_pages)

    class Args:
        chunk_pages, doc_batch, dpi = 16, 8, 72

    class Bar:
        def update(self, k):
            pass

    search.encode_document(doc, index, lambda batch: [next(images) for _ in batch], pool_factor, Args, Bar())
    search.write_catalog(index, [doc], complete=True)
    search.write_json(os.path.join(index, "index.json"), {"embedding": {"proj_dim": dim, "pool_factor": pool_factor}})
    queries = [
        torch.nn.functional.normalize(pages[3 * i][:8] + 0.3 * torch.randn(8, dim, generator=g), dim=-1)
        for i in range(10)
    ]
    return doc, queries


def test_qdrant_local_mode_returns_the_local_index_top_k(tmp_path):
    pytest.importorskip("qdrant_client", reason="optional: pip install -r requirements-qdrant.txt")
    index = tmp_path / "index"
    doc, queries = planted_store(str(index))
    identity = {"embedding": {"proj_dim": 16, "pool_factor": 2}}
    sync = search.qdrant_sync(str(tmp_path / "qdrant"), "planted", str(index), identity)
    assert (sync["upserted"], sync["points"]) == (40, 40)
    assert search.qdrant_sync(str(tmp_path / "qdrant"), "planted", str(index), identity)["upserted"] == 0

    class Args:
        qdrant, collection, top, rerank, exact = str(tmp_path / "qdrant"), "planted", 5, 20, False

    _, vectors = stored_pages(str(index))
    local = search.search_local(queries, vectors, Args, "cpu", torch.float32)
    remote = search.qdrant_search(Args, identity, queries)
    for i, (mine, theirs) in enumerate(zip(local, remote)):
        assert [(p["path"], p["page"]) for p in theirs] == [vectors.refs[j] for j, _ in mine]
        assert theirs[0]["page"] == 3 * i + 1
        assert [p["score"] for p in theirs] == pytest.approx([s for _, s in mine], abs=1e-4)
    other = {"embedding": {"proj_dim": 16, "pool_factor": 3}}
    with pytest.raises(UserValueError, match="another model"):
        search.qdrant_search(Args, other, queries)


def test_an_index_at_a_matryoshka_prefix_keeps_it_for_its_queries(ckpt, tmp_path):
    """--dim 8 of a checkpoint trained at (16, 8) by the test's hand: the stored vectors have 8 entries, and query
    rebuilds the model at that size (the same vectors, so no refusal) and answers."""
    mrl = torch.load(ckpt, weights_only=True)
    mrl["meta"]["proj_dim"] = mrl["heads"]["query_head.weight"].shape[0]
    mrl["meta"]["matryoshka_dims"] = [mrl["meta"]["proj_dim"], 8]
    torch.save(mrl, tmp_path / "mrl.pt")
    (tmp_path / "docs").mkdir()
    render_keyword_page(WORDS[0]).save(tmp_path / "docs" / "a.png")
    render_keyword_page(WORDS[1]).save(tmp_path / "docs" / "b.png")
    run(
        "index",
        "--ckpt",
        tmp_path / "mrl.pt",
        "--docs",
        tmp_path / "docs",
        "--index",
        tmp_path / "index",
        "--dim",
        8,
        "--device",
        "cpu",
    )
    pages, _ = stored_pages(str(tmp_path / "index"))
    assert {p.shape[1] for p in pages.values()} == {8}
    answers = run("query", "--index", tmp_path / "index", "--top", 1, "--device", "cpu", query(WORDS[0]))
    assert len(answers[0]["results"]) == 1
