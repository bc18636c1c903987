"""make_synthetic_data.py: both output formats load, output is deterministic, answers live only in pixels,
pages keep the token grid through InternVL's tiler, bad flags fail clearly."""

import os
import random
import re

import datasets
import numpy as np
import pytest
from PIL import Image

import make_synthetic_data as gen
from colintern_data import PageResolver, load_page_dataset, pseudo_path
from colintern_model import ColInternProcessor

FLAGS = ["--topics", "4", "--train_pages", "10", "--eval_pages", "3", "--no_progress"]


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path_factory, monkeypatch):
    # Keep load_dataset's cache inside the test's temp folder (and away from other runs' folders).
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))


def generate(out_dir, *extra) -> str:
    gen.main(gen.parse_args(["--out_dir", str(out_dir), *FLAGS, *extra]))
    return str(out_dir)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic") / "out", "--seed", "3", "--workers", "2")


def load_eval(out, config):
    return datasets.load_dataset(os.path.join(out, "eval"), config, split="test")


def template_of(query: str):
    """(template, topic) if the query is one of the templates filled with a topic, else None."""
    for template in gen.QUERY_TEMPLATES:
        m = re.fullmatch(re.escape(template).replace(re.escape("{topic}"), "(?P<topic>.+)"), query)
        if m:
            return template, m["topic"]
    return None


def band(image):
    """The title's token row, where (and only where) a page names its topic."""
    return np.asarray(image.convert("RGB"))[gen.GRID : (1 + gen.TITLE_ROWS) * gen.GRID]


def test_train_set_loads_through_load_page_dataset_and_load_dataset(synthetic):
    path = os.path.join(synthetic, "train")
    ours = load_page_dataset(path, "train")
    hub = datasets.load_dataset(path, split="train")
    for ds in (ours, hub):
        assert len(ds) == 10
        assert set(ds.column_names) == {"query", "image", "image_filename", "answer", "source"}
    assert list(ours["query"]) == list(hub["query"])
    topics = gen.TOPICS[:4]
    for row in ours:
        assert row["image"].size in gen.PAGE_SIZES.values()
        template, topic = template_of(row["query"])
        assert topic == row["answer"] and topic in topics
    # several pages per topic, spread evenly (10 pages over 4 topics: 2 or 3 each)
    counts = {t: list(ours["answer"]).count(t) for t in topics}
    assert sorted(counts.values()) == [2, 2, 3, 3], counts
    # JSONL triples name its pages by HF pseudo-path
    page = PageResolver()(pseudo_path(path, "train", 7))
    assert np.array_equal(np.asarray(page), np.asarray(ours[7]["image"].convert("RGB")))


def test_eval_set_has_the_vidore_layout_and_one_relevant_page_per_query(synthetic):
    corpus, queries, qrels = (load_eval(synthetic, c) for c in ("corpus", "queries", "qrels"))
    assert corpus.column_names == ["corpus-id", "image"]
    assert queries.column_names == ["query-id", "query"]
    assert qrels.column_names == ["query-id", "corpus-id", "score"]
    assert len(corpus) == len(queries) == len(qrels) == 3
    assert len(set(corpus["corpus-id"])) == 3 and len(set(queries["query-id"])) == 3
    assert set(qrels["corpus-id"]) <= set(corpus["corpus-id"])
    assert sorted(qrels["query-id"]) == sorted(queries["query-id"])
    assert all(isinstance(i, int) for i in list(corpus["corpus-id"]) + list(queries["query-id"]) + list(qrels["score"]))
    # the relevant page is the one whose title band shows the query's topic: the same band as a fresh rendering
    # of that topic with unrelated filler, and unlike every other topic's band
    pages = dict(zip(corpus["corpus-id"], corpus["image"]))
    texts = dict(zip(queries["query-id"], queries["query"]))
    for row in qrels:
        page = pages[row["corpus-id"]]
        _, topic = template_of(texts[row["query-id"]])
        geometry = next(k for k, size in gen.PAGE_SIZES.items() if size == page.size)
        for other in gen.TOPICS[:4]:
            fresh = gen.render_page(other, geometry, random.Random("unrelated filler"))
            assert np.array_equal(band(page), band(fresh)) == (other == topic), (topic, other)


def test_answers_are_only_in_the_pixels(synthetic):
    train = load_page_dataset(os.path.join(synthetic, "train"), "train")
    keywords = [t.lower() for t in gen.TOPICS]
    metadata = list(train["image_filename"]) + list(train["source"])
    metadata += [str(i) for i in load_eval(synthetic, "corpus")["corpus-id"]]
    for text in metadata:
        assert not any(k in text.lower() for k in keywords), text
    # filler text never names a topic either, so the title is the only place it appears
    assert not {w.lower() for w in gen.FILLER_WORDS + gen.SECTION_WORDS} & set(keywords)
    # held-out pages are new renderings, not copies of training pages
    train_bytes = {np.asarray(im).tobytes() for im in train["image"]}
    assert not any(np.asarray(im).tobytes() in train_bytes for im in load_eval(synthetic, "corpus")["image"])


def test_same_seed_gives_the_same_bytes_and_another_seed_other_pages(synthetic, tmp_path):
    again = generate(tmp_path / "again", "--seed", "3", "--workers", "1")  # and rendering in 2 processes or 1 agrees
    other = generate(tmp_path / "other", "--seed", "4")
    for part in (
        "train/data/train-00000-of-00001.parquet",
        "eval/corpus/test-00000-of-00001.parquet",
        "eval/queries/test-00000-of-00001.parquet",
        "eval/qrels/test-00000-of-00001.parquet",
        "train/README.md",
        "eval/README.md",
    ):
        with open(os.path.join(synthetic, part), "rb") as a, open(os.path.join(again, part), "rb") as b:
            assert a.read() == b.read(), part
    first = load_page_dataset(os.path.join(synthetic, "train"), "train")["image"]
    second = load_page_dataset(os.path.join(other, "train"), "train")["image"]
    assert all(np.asarray(a).tobytes() != np.asarray(b).tobytes() for a, b in zip(first, second))


def test_regenerating_in_place_is_not_served_from_a_stale_cache(tmp_path):
    # datasets caches a folder with a `configs:` card by its name and card only; the card's digests make it reload
    out = generate(tmp_path / "eval_twice", "--seed", "5")
    before = load_eval(out, "queries")["query"], load_page_dataset(os.path.join(out, "train"))["query"]
    generate(tmp_path / "eval_twice", "--seed", "6", "--topics", "5", "--eval_pages", "5")
    after = load_eval(out, "queries")["query"], load_page_dataset(os.path.join(out, "train"))["query"]
    assert len(before[0]) == 3 and len(after[0]) == 5
    assert list(before[1]) != list(after[1])


@pytest.mark.parametrize("geometry", sorted(gen.PAGE_SIZES))
def test_pages_tile_exactly_and_the_title_row_stays_on_the_token_grid(geometry, tiny_model_dir):
    processor = ColInternProcessor.from_pretrained(tiny_model_dir, max_tiles=4)
    tile = processor.hf.image_processor.size["height"]
    width, height = gen.PAGE_SIZES[geometry]
    page = gen.render_page("Glaciers", geometry, random.Random(0))
    assert page.size == (width, height)
    batch = processor.process_pages([page])
    cols, rows = width // 448, height // 448
    assert batch["pixel_values"].shape[0] == cols * rows + 1  # whole tiles + the thumbnail
    # the tiles are the page scaled by tile/448 with no distortion: they reassemble into the resized page
    tiles = batch["pixel_values"][:-1].reshape(rows, cols, 3, tile, tile).permute(2, 0, 3, 1, 4)
    mosaic = tiles.reshape(3, rows * tile, cols * tile).permute(1, 2, 0).numpy().astype(np.float32)  # uint8 pixels
    direct = np.asarray(page.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(mosaic - direct).mean() < 1.0
    # the title band fills whole token rows from row 1 (one token = 28 tile pixels), so its tokens see the same
    # pixels on every page: band colour just inside its edges, paper just outside
    token = 28
    top, bottom = gen.GRID * tile // 448, (1 + gen.TITLE_ROWS) * gen.GRID * tile // 448
    assert top % token == 0 and bottom % token == 0
    assert np.abs(mosaic[top + 2 : bottom - 2, :4] - np.array(gen.TITLE_BAND)).max() < 3
    assert np.abs(mosaic[[top - 3, bottom + 2], :4] - np.array(gen.TITLE_BAND)).min() > 100


def test_every_title_fits_inside_its_token_row_and_the_narrowest_page():
    font = gen.font(gen.TITLE_SIZE)
    x, y = gen.title_origin()
    for topic in gen.TOPICS:
        left, top, right, bottom = font.getbbox(topic)
        assert gen.GRID <= y + top and y + bottom <= (1 + gen.TITLE_ROWS) * gen.GRID, topic
        assert x + right <= min(w for w, _ in gen.PAGE_SIZES.values()) - 8, topic


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topics", "1"], "--topics"),
        (["--topics", str(len(gen.TOPICS) + 1), "--train_pages", "500"], "--topics"),
        (["--topics", "10", "--train_pages", "9"], "--train_pages"),
        (["--topics", "4", "--eval_pages", "5"], "--eval_pages"),
        (["--topics", "4", "--eval_pages", "0"], "--eval_pages"),
        (["--page_sizes", "portrait,a4"], "--page_sizes"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_flags_fail_before_writing_anything(flags, message, tmp_path, capsys):
    argv = ["--out_dir", str(tmp_path / "out"), "--no_progress", *flags]
    with pytest.raises(SystemExit) as exit_info:
        gen.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match=re.escape(message)):
        gen.main(gen.build_parser().parse_args(argv))
    assert not (tmp_path / "out").exists()
