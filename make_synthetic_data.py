"""Synthetic document pages whose query answers are only in the pixels: a training set and a held-out eval set.

    python make_synthetic_data.py --out_dir outputs/synthetic
    python make_synthetic_data.py --out_dir outputs/synthetic --topics 50 --train_pages 200 --eval_pages 50 --seed 0

Writes (every file atomically; existing files of the same name are replaced):
    OUT/train/data/train-00000-of-00001.parquet   the columns of vidore/colpali_train_set: query, image,
                                                   image_filename, answer, source
    OUT/train/README.md                            dataset card with a `configs:` block (split "train")
    OUT/eval/{corpus,queries,qrels}/test-00000-of-00001.parquet, OUT/eval/README.md
                                                   the ViDoRe v1 hub layout (mteb/*_beir): corpus (corpus-id, image),
                                                   queries (query-id, query), qrels (query-id, corpus-id, score)

so that `train.py --train_hub OUT/train`, HF pseudo-paths `OUT/train/train/doc_{i}.png`,
`datasets.load_dataset("OUT/eval", "corpus", split="test")` and `eval.py --local_task OUT/eval` all read them.

Each topic is a keyword printed as the page's title; the query asks for the page about that keyword ("Which page is
about Glaciers?" and paraphrases). The rest of the page (header, paragraphs, a table or a bar/line chart, footer) is
seeded filler that differs on every page, so only the title tells pages apart, and the title exists only as pixels
(file names and ids are numbers). Several training pages share each topic (true near-duplicates for mining to meet as
false negatives); the eval set holds one new rendering per topic, with one query whose only relevant page it is.

Why the geometry is rigid: a frozen random vision tower has no learned shift invariance. One vision token covers
28x28 tile pixels, so the title's pixels must sit at the same offset from the token grid on every page or its tokens
get unrelated features and nothing can be learnt on held-out pages. Page sides are multiples of 448 px with aspect
ratios that InternVL's tiler maps to whole tiles (max_tiles 4: 1x2, 2x1, 2x2, 1x3), so tiling only scales them by
tile/448, and the title sits at a fixed offset from a GRID = 56 px lattice: one token at tile 224 (the tiny model),
two at tile 448 (InternVL3.5). Same seed, same bytes.
"""

import functools
import io
import os
import random

from PIL import Image, ImageDraw, ImageFont

from colintern_cli import ArgumentParser, UserValueError, progress_bar, run_cli
from colintern_data import check_output

GRID = 56  # page pixels per vision token at tile 224 (pages are downscaled 2x); 2 tokens at tile 448

# Page geometries: (width, height) in pixels, all exact tile multiples for tile 224 and 448 at max_tiles 4.
PAGE_SIZES = {
    "portrait": (448, 896),  # 1x2 tiles + thumbnail: 192 image tokens at tile 224
    "landscape": (896, 448),  # 2x1 tiles + thumbnail: 192 (a slide)
    "square": (896, 896),  # 2x2 tiles + thumbnail: 320
    "tall": (448, 1344),  # 1x3 tiles + thumbnail: 256 (a long report page)
}
DEFAULT_PAGE_SIZES = "portrait,landscape,square,tall"

TOPICS = [
    "Glaciers",
    "Railways",
    "Vaccines",
    "Orchards",
    "Satellites",
    "Copper",
    "Wetlands",
    "Tourism",
    "Lithium",
    "Poetry",
    "Harbors",
    "Coffee",
    "Volcanoes",
    "Insurance",
    "Textiles",
    "Robotics",
    "Dairy",
    "Telescopes",
    "Wildfires",
    "Banking",
    "Pottery",
    "Tunnels",
    "Malaria",
    "Cinema",
    "Fisheries",
    "Hydrogen",
    "Museums",
    "Spices",
    "Turbines",
    "Aviation",
    "Coral",
    "Chess",
    "Pipelines",
    "Olives",
    "Theatre",
    "Drones",
    "Wool",
    "Marathons",
    "Silver",
    "Vineyards",
    "Geology",
    "Whales",
    "Bridges",
    "Sugar",
    "Optics",
    "Deserts",
    "Rubber",
    "Tennis",
    "Plastics",
    "Zoology",
    "Cycling",
    "Diamonds",
    "Forestry",
    "Pharmacy",
    "Tides",
    "Bakeries",
    "Ceramics",
    "Mangroves",
    "Lighthouses",
    "Beekeeping",
    "Orchids",
    "Salmon",
    "Monsoons",
    "Caves",
    "Helicopters",
    "Typography",
    "Origami",
    "Jazz",
    "Tulips",
    "Kites",
    "Meteorites",
    "Sailing",
    "Ballet",
    "Bamboo",
    "Cocoa",
    "Falcons",
    "Lanterns",
    "Mosaics",
    "Nickel",
    "Opera",
    "Penguins",
    "Quartz",
    "Rowing",
    "Sculpture",
    "Tapestry",
    "Uranium",
    "Violins",
    "Walnuts",
    "Yoga",
    "Zinc",
    "Archery",
    "Bison",
    "Canals",
    "Dolphins",
    "Elephants",
    "Fossils",
    "Geysers",
    "Honey",
    "Icebergs",
    "Judo",
]

QUERY_TEMPLATES = [
    "Which page is about {topic}?",
    "Find the page about {topic}.",
    "Which document discusses {topic}?",
    "Show me the report on {topic}.",
    "Where is the section on {topic}?",
]

# Filler vocabulary: no topic keyword appears in it, so the title is the only place a topic is named.
FILLER_WORDS = (
    "the of and to in for on with by from at as results quarter increase measured values compared previous period "
    "analysis sample figure shows average total growth rate region program budget cost level data review committee "
    "project survey units annual summary estimate method index trend share target capacity demand supply output "
    "members staff network model system process standard policy plan phase section version draft note source percent "
    "was were is are has have been this that these those which while during after before between across within "
    "higher lower stable steady strong weak early late first second third final overall local national regional "
    "increased decreased remained reached exceeded improved reduced expanded reported observed recorded expected "
    "operations management performance quality safety training services customers partners suppliers contracts "
    "revenue expenses margin assets investment funding grants members volunteers visitors schedule timeline "
    "meeting board agreement framework guidelines evaluation monitoring maintenance inspection equipment facilities"
).split()
SECTION_WORDS = "Overview Background Methods Results Outlook Summary Findings Context Operations Finance".split()
ORGS = [
    "Northwind Institute",
    "Blue Ridge Council",
    "Harper & Cole",
    "Meridian Group",
    "Atlas Foundation",
    "Eastgate Authority",
    "Lumen Partners",
    "Riverside Trust",
    "Kestrel Labs",
    "Oakfield University",
]
MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
PALETTE = [
    (52, 101, 164),
    (204, 85, 0),
    (78, 154, 6),
    (117, 80, 123),
    (193, 125, 17),
    (32, 140, 140),
    (164, 0, 0),
    (85, 87, 83),
]
INK = (20, 20, 20)
GREY = (110, 110, 110)
# The title is white on a house-style navy band two token rows high: in black on the page, its few tokens are
# drowned by the body text's many similar ones, and the tiny model does not learn (docs/benchmarks.md).
TITLE_SIZE = 64  # the longest keyword still fits a 448 px page
TITLE_ROWS = 2  # GRID rows the title band spans
TITLE_BAND = (31, 56, 100)


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font: no system fonts needed, identical pixels on every machine."""
    return ImageFont.load_default(size=size)


# -----------------------------------------------------------------------------
# Filler text


def sentence(rng: random.Random) -> str:
    words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(6, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randint(1, len(words) - 1), f"{rng.uniform(1, 99):.1f}%")
    return " ".join(words).capitalize() + "."


def wrap(text: str, width: int, f: ImageFont.FreeTypeFont) -> list:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and f.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def line_height(size: int) -> int:
    return round(size * 1.35)


# -----------------------------------------------------------------------------
# Page elements. Each draws into the box (x, y, width, max_height) and returns the height it used,
# or 0 when it does not fit (the caller then tries something smaller or stops).


def draw_paragraph(draw, rng, x, y, width, max_height) -> int:
    size = rng.randint(12, 15)
    lines = wrap(" ".join(sentence(rng) for _ in range(rng.randint(2, 5))), width, font(size))
    lines = lines[: max(0, max_height // line_height(size))]
    if len(lines) < 2:
        return 0
    for n, text in enumerate(lines):
        draw.text((x, y + n * line_height(size)), text, fill=INK, font=font(size))
    return len(lines) * line_height(size)


def draw_bullets(draw, rng, x, y, width, max_height) -> int:
    size = rng.randint(13, 16)
    used = 0
    for _ in range(rng.randint(3, 6)):
        lines = wrap(sentence(rng), width - 18, font(size))[:2]
        height = len(lines) * line_height(size) + 6
        if used + height > max_height:
            break
        draw.ellipse((x + 2, y + used + size // 2 - 3, x + 8, y + used + size // 2 + 3), fill=INK)
        for n, text in enumerate(lines):
            draw.text((x + 18, y + used + n * line_height(size)), text, fill=INK, font=font(size))
        used += height
    return used


def caption(rng, kind: str) -> str:
    words = " ".join(rng.choice(FILLER_WORDS[10:]) for _ in range(rng.randint(3, 6)))
    return f"{kind} {rng.randint(1, 9)}. {words.capitalize()}"


def draw_table(draw, rng, x, y, width, max_height) -> int:
    size = rng.randint(11, 14)
    n_cols, n_rows = rng.randint(3, 5), rng.randint(3, 8)
    row_h = line_height(size) + 6
    height = (n_rows + 1) * row_h + line_height(size) + 8
    if height > max_height:
        n_rows = (max_height - line_height(size) - 8) // row_h - 1
        if n_rows < 2:
            return 0
        height = (n_rows + 1) * row_h + line_height(size) + 8
    draw.text((x, y), caption(rng, "Table"), fill=GREY, font=font(size))
    top = y + line_height(size) + 8
    col_w = width // n_cols
    header_fill = rng.choice(PALETTE)
    draw.rectangle((x, top, x + col_w * n_cols, top + row_h), fill=header_fill)
    headers = [rng.choice(["Item", "Region", "Unit", "Group"])] + [
        rng.choice([f"{2010 + rng.randint(0, 14)}", rng.choice(MONTHS), f"Q{rng.randint(1, 4)}", "Total", "Change"])
        for _ in range(n_cols - 1)
    ]
    for c, text in enumerate(headers):
        draw.text((x + c * col_w + 5, top + 3), text, fill=(255, 255, 255), font=font(size))
    for r in range(1, n_rows + 1):
        row_top = top + r * row_h
        if r % 2 == 0:
            draw.rectangle((x, row_top, x + col_w * n_cols, row_top + row_h), fill=(238, 240, 244))
        cells = [rng.choice(FILLER_WORDS[10:]).capitalize()] + [
            f"{rng.uniform(0, 999):,.{rng.randint(0, 2)}f}" for _ in range(n_cols - 1)
        ]
        for c, text in enumerate(cells):
            draw.text((x + c * col_w + 5, row_top + 3), text, fill=INK, font=font(size))
    draw.line((x, top + (n_rows + 1) * row_h, x + col_w * n_cols, top + (n_rows + 1) * row_h), fill=GREY)
    return height


def chart_frame(draw, rng, x, y, width, max_height):
    """Caption, axes and y ticks; -> (plot box, value range) or None when it does not fit."""
    size = rng.randint(11, 13)
    height = min(max_height, rng.randint(150, 260))
    if height < 120:
        return None
    draw.text((x, y), caption(rng, "Figure"), fill=GREY, font=font(size))
    left, top = x + 40, y + line_height(size) + 10
    right, bottom = x + width - 10, y + height - line_height(size) - 6
    top_value = rng.choice([10, 50, 100, 250, 1000])
    for k in range(5):
        ty = bottom - k * (bottom - top) / 4
        draw.line((left, ty, right, ty), fill=(225, 225, 225))
        draw.text((x, ty - size // 2), f"{top_value * k // 4}", fill=GREY, font=font(size))
    draw.line((left, top, left, bottom), fill=INK)
    draw.line((left, bottom, right, bottom), fill=INK)
    return (left, top, right, bottom, size), top_value, height


def draw_bar_chart(draw, rng, x, y, width, max_height) -> int:
    frame = chart_frame(draw, rng, x, y, width, max_height)
    if frame is None:
        return 0
    (left, top, right, bottom, size), top_value, height = frame
    n = rng.randint(3, 8)
    labels = rng.choice([MONTHS, [f"Q{i}" for i in range(1, 9)], [str(2015 + i) for i in range(9)]])
    slot = (right - left) / n
    colour = rng.choice(PALETTE)
    for i in range(n):
        value = rng.uniform(0.1, 1.0)
        x0 = left + i * slot + slot * 0.2
        draw.rectangle((x0, bottom - value * (bottom - top), x0 + slot * 0.6, bottom), fill=colour)
        draw.text((x0, bottom + 3), labels[i % len(labels)], fill=GREY, font=font(size))
    return height


def draw_line_chart(draw, rng, x, y, width, max_height) -> int:
    frame = chart_frame(draw, rng, x, y, width, max_height)
    if frame is None:
        return 0
    (left, top, right, bottom, size), top_value, height = frame
    n = rng.randint(5, 12)
    for colour in rng.sample(PALETTE, rng.randint(1, 3)):
        value = rng.uniform(0.2, 0.8)
        points = []
        for i in range(n):
            value = min(0.98, max(0.02, value + rng.uniform(-0.2, 0.2)))
            points.append((left + 8 + i * (right - left - 16) / (n - 1), bottom - value * (bottom - top)))
        draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
    return height


FIGURES = [draw_table, draw_bar_chart, draw_line_chart]
TEXT = [draw_paragraph, draw_paragraph, draw_bullets]


def fill_column(draw, rng, x, y, width, bottom, figure_first: bool = False) -> None:
    """Text and figures down one column until it is full; a figure comes first, or at the latest once half the column
    is used (the column of a slide may be too short for one: its other column then starts with one)."""
    start, figure_done = y, False
    while bottom - y > 40:
        figure_due = not figure_done and (figure_first or y - start > (bottom - start) / 2)
        want_figure = figure_due or rng.random() < 0.3
        element = rng.choice(FIGURES if want_figure else TEXT)
        used = element(draw, rng, x, y, width, bottom - y)
        if used == 0:
            if element in FIGURES:  # no room for a figure: finish with text
                used = draw_paragraph(draw, rng, x, y, width, bottom - y)
            if used == 0:
                return
        figure_done = figure_done or element in FIGURES
        if element in TEXT and rng.random() < 0.4 and bottom - y - used > 60:  # a section heading
            used += 10
            draw.text((x, y + used), rng.choice(SECTION_WORDS), fill=INK, font=font(18))
            used += 16
        y += used + rng.randint(12, 24)


# -----------------------------------------------------------------------------
# Pages


def title_origin() -> tuple:
    """Where the title is drawn: token column 1, its ink (ascenders to descenders) centred in the band that starts
    at token row 1. The same offset from the GRID lattice on every page."""
    _, top, _, bottom = font(TITLE_SIZE).getbbox("Hgjy")
    return GRID, GRID + (TITLE_ROWS * GRID - top - bottom) // 2


def render_page(topic: str, geometry: str, rng: random.Random) -> Image.Image:
    """One page: a header line, the topic as title on the token grid, a subtitle rule, then filler columns."""
    width, height = PAGE_SIZES[geometry]
    paper = rng.choice([(255, 255, 255), (252, 251, 247), (248, 249, 252)])
    page = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(page)
    org = rng.choice(ORGS)
    draw.text(
        (GRID, 18),
        f"{org} · {rng.choice(['Annual report', 'Briefing', 'Working paper', 'Bulletin'])} {rng.randint(2005, 2025)}",
        fill=GREY,
        font=font(12),
    )
    draw.rectangle((0, GRID, width, (1 + TITLE_ROWS) * GRID), fill=TITLE_BAND)  # whole token rows
    draw.text(title_origin(), topic, fill=(255, 255, 255), font=font(TITLE_SIZE))
    rule_y = (1 + TITLE_ROWS) * GRID + 10
    draw.line((GRID, rule_y, width - GRID // 2, rule_y), fill=rng.choice(PALETTE), width=3)
    draw.text(
        (GRID, rule_y + 10),
        f"{rng.choice(SECTION_WORDS)} · {rng.choice(MONTHS)} {rng.randint(2005, 2025)}"
        f" · {rng.choice(FILLER_WORDS[10:]).capitalize()} notes",
        fill=GREY,
        font=font(14),
    )
    top, bottom, margin = (2 + TITLE_ROWS) * GRID + 8, height - GRID + 8, GRID // 2
    if width > 448:  # two columns; a slide puts its figure first
        mid = width // 2
        fill_column(
            draw,
            rng,
            margin + GRID // 2,
            top,
            mid - margin - GRID // 2 - 12,
            bottom,
            figure_first=geometry == "landscape" and rng.random() < 0.5,
        )
        fill_column(draw, rng, mid + 12, top, width - mid - margin - 12, bottom, figure_first=True)
    else:
        fill_column(draw, rng, margin, top, width - 2 * margin, bottom)
    draw.text((width // 2 - 10, height - 30), f"{rng.randint(1, 240)}", fill=GREY, font=font(12))
    return page


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # zlib at a fixed level: the same pixels give the same bytes
    return buf.getvalue()


def page_rng(seed: int, part: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: independent of PYTHONHASHSEED and of the other pages.
    return random.Random(f"{seed}:{part}:{index}")


def query_for(topic: str, rng: random.Random) -> str:
    return rng.choice(QUERY_TEMPLATES).format(topic=topic)


def train_topics(topics: list, n_pages: int, seed: int) -> list:
    """Topic of each training page: shuffled rounds over all topics, so every topic gets n_pages/len(topics) pages
    (+-1) and each block of len(topics) rows (rows 0.., T.., 2T..) holds every topic once."""
    rng = random.Random(f"{seed}:train-order")
    order = []
    while len(order) < n_pages:
        order += rng.sample(topics, len(topics))
    return order[:n_pages]


def render_train_row(job: tuple) -> dict:
    """One training row from (index, topic, geometries, seed); its own seeded rng, so any process renders it the
    same."""
    i, topic, geometries, seed = job
    rng = page_rng(seed, "train", i)
    geometry = rng.choice(geometries)
    image = render_page(topic, geometry, rng)
    return {
        "query": query_for(topic, rng),
        "image": {"bytes": png_bytes(image), "path": None},
        "image_filename": f"synthetic/train/page_{i:05d}.png",
        "answer": topic,
        "source": f"synthetic_{geometry}",
    }


def render_eval_row(job: tuple) -> tuple:
    """(query_id, topic, geometries, seed) -> (png bytes, query) of one held-out page."""
    query_id, topic, geometries, seed = job
    rng = page_rng(seed, "eval", query_id)
    image = render_page(topic, rng.choice(geometries), rng)
    return png_bytes(image), query_for(topic, rng)


def render_all(render, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """render(job) for every job, in order, on `workers` processes (1: in this process). Every page is seeded by its
    index alone, so the bytes do not depend on the number of workers."""
    bar = dict(total=len(jobs), desc=desc, unit="page", disable=not progress)
    if workers <= 1 or len(jobs) < 2 * workers:
        return [render(job) for job in progress_bar(jobs, **bar)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(progress_bar(pool.imap(render, jobs, chunksize=8), **bar))


def make_train_rows(
    topics: list, n_pages: int, geometries: list, seed: int, progress: bool = True, workers: int = 1
) -> list:
    jobs = [(i, topic, geometries, seed) for i, topic in enumerate(train_topics(topics, n_pages, seed))]
    return render_all(render_train_row, jobs, workers, "train pages", progress)


def make_eval_rows(topics: list, n_pages: int, geometries: list, seed: int, progress: bool = True, workers: int = 1):
    """-> corpus, queries, qrels rows: one new page per topic (its own seeds), one query, one relevant page.
    Corpus ids are shuffled against query ids so that no id order gives the answer away."""
    chosen = random.Random(f"{seed}:eval-topics").sample(topics, n_pages)
    corpus_ids = random.Random(f"{seed}:eval-ids").sample(range(n_pages), n_pages)
    rendered = render_all(
        render_eval_row,
        [(query_id, topic, geometries, seed) for query_id, topic in enumerate(chosen)],
        workers,
        "eval pages",
        progress,
    )
    corpus, queries, qrels = [], [], []
    for query_id, (png, query) in enumerate(rendered):
        corpus.append({"corpus-id": corpus_ids[query_id], "image": {"bytes": png, "path": None}})
        queries.append({"query-id": query_id, "query": query})
        qrels.append({"query-id": query_id, "corpus-id": corpus_ids[query_id], "score": 1})
    corpus.sort(key=lambda row: row["corpus-id"])
    return corpus, queries, qrels


# -----------------------------------------------------------------------------
# Writing


def write_text(path: str, text: str) -> None:
    from colintern_data import atomic_path  # temp file + rename

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_parquet(path: str, rows: list, features) -> str:
    """Rows -> parquet with the datasets feature schema embedded (so `image` loads back as PIL images).
    -> the file's sha256, which the dataset card records (see `card`)."""
    import datasets

    from colintern_data import atomic_path, file_sha256

    columns = {name: [row[name] for row in rows] for name in features}
    dataset = datasets.Dataset.from_dict(columns, features=features)
    with atomic_path(path) as tmp:
        dataset.to_parquet(tmp)
    return file_sha256(path)


def train_features():
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    return Features(
        {
            "query": Value("string"),
            "image": ImageFeature(),
            "image_filename": Value("string"),
            "answer": Value("string"),
            "source": Value("string"),
        }
    )


def eval_features():
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    return {
        "corpus": Features({"corpus-id": Value("int64"), "image": ImageFeature()}),
        "queries": Features({"query-id": Value("int64"), "query": Value("string")}),
        "qrels": Features({"query-id": Value("int64"), "corpus-id": Value("int64"), "score": Value("int64")}),
    }


def card(configs: dict, text: str) -> str:
    """A dataset card whose YAML `configs:` block tells `datasets.load_dataset` which files make which split.

    configs: {config name: (split, file pattern, sha256 of its file)}. The digest goes into each config's
    `description` because datasets (5.x) keys its cache of a local folder with a `configs:` block only by the folder's
    name and these YAML entries, not by the files: without it, regenerating a folder in place, or loading another
    folder also called `eval`, would silently return the previously cached rows."""
    lines = ["---", "configs:"]
    for name, (split, pattern, digest) in configs.items():
        lines += [
            f"- config_name: {name}",
            f'  description: "sha256 {digest}"',
            "  data_files:",
            f"  - split: {split}",
            f"    path: {pattern}",
        ]
    return "\n".join(lines + ["---", "", text.strip(), ""])


def remove_card(folder: str) -> None:
    # A card left from an earlier run would carry the old digests while the data files are replaced.
    path = os.path.join(folder, "README.md")
    if os.path.exists(path):
        os.unlink(path)


def write_train(out: str, rows: list, args) -> str:
    remove_card(out)
    path = os.path.join(out, "data", "train-00000-of-00001.parquet")
    digest = write_parquet(path, rows, train_features())
    write_text(
        os.path.join(out, "README.md"),
        card(
            {"default": ("train", "data/train-*", digest)},
            f"# ColIntern synthetic training pages\n\n{len(rows)} pages, {args.topics} topics, seed {args.seed}, "
            f"written by `make_synthetic_data.py`. Columns as `vidore/colpali_train_set`: `query`, `image`, "
            f"`image_filename`, `answer` (the page title), `source` (`synthetic_<geometry>`).",
        ),
    )
    return path


def write_eval(out: str, corpus: list, queries: list, qrels: list, args) -> None:
    remove_card(out)
    features = eval_features()
    configs = {}
    for name, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        digest = write_parquet(os.path.join(out, name, "test-00000-of-00001.parquet"), rows, features[name])
        configs[name] = ("test", f"{name}/test-*", digest)
    write_text(
        os.path.join(out, "README.md"),
        card(
            configs,
            f"# ColIntern synthetic evaluation pages\n\nViDoRe v1 hub layout: {len(corpus)} pages, "
            f"{len(queries)} queries, one relevant page each (seed {args.seed}), written by "
            f"`make_synthetic_data.py`.",
        ),
    )


def parse_geometries(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PAGE_SIZES]
    if unknown or not names:
        raise UserValueError(
            f"--page_sizes {text!r}: unknown geometry {unknown or '(none given)'}; choose a comma list from "
            f"{', '.join(f'{k} {w}x{h}' for k, (w, h) in PAGE_SIZES.items())}"
        )
    return names


def check_args(args) -> None:
    """Refuse flag combinations that cannot make a sensible dataset, naming the flag and what to pass."""
    if not 2 <= args.topics <= len(TOPICS):
        raise UserValueError(
            f"--topics must be between 2 and {len(TOPICS)} (the built-in keyword list), got {args.topics}"
        )
    if args.train_pages < args.topics:
        raise UserValueError(
            f"--train_pages {args.train_pages} < --topics {args.topics}: every topic needs a training "
            f"page; pass --train_pages >= {args.topics} (several per topic is the point)"
        )
    if args.workers < 1:
        raise UserValueError(f"--workers must be >= 1, got {args.workers}")
    if args.eval_pages is not None and not 1 <= args.eval_pages <= args.topics:
        raise UserValueError(
            f"--eval_pages must be between 1 and --topics {args.topics} (one page per topic, so each "
            f"query has one relevant page), got {args.eval_pages}"
        )


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--out_dir",
        default="outputs/synthetic",
        help="folder to write train/ and eval/ into (created; files of the same name are replaced)",
    )
    p.add_argument(
        "--topics",
        type=int,
        default=50,
        help=f"number of topic keywords, each printed as the title of its pages (2..{len(TOPICS)})",
    )
    p.add_argument(
        "--train_pages",
        type=int,
        default=200,
        help="training pages, spread evenly over the topics (>= --topics; 4 per topic by default)",
    )
    p.add_argument(
        "--eval_pages",
        type=int,
        default=None,
        help="held-out pages = queries, one per topic, on a seeded subset of topics (default: all topics)",
    )
    p.add_argument(
        "--page_sizes",
        default=DEFAULT_PAGE_SIZES,
        help="comma list of page geometries to draw from: "
        + ", ".join(f"{k} {w}x{h}" for k, (w, h) in PAGE_SIZES.items()),
    )
    p.add_argument("--seed", type=int, default=0, help="seed of all filler, layouts, queries and orders")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes that render pages (min(4, CPUs) unless given); the bytes do not depend on it",
    )
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:  # main checks again, for callers that build args themselves
        check_args(args)
        parse_geometries(args.page_sizes)
    except ValueError as e:
        p.error(str(e))
    return args


def main(args):
    check_args(args)
    geometries = parse_geometries(args.page_sizes)
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()  # its "Creating parquet" bars
    topics = TOPICS[: args.topics]
    eval_pages = args.eval_pages if args.eval_pages is not None else args.topics
    progress = not args.no_progress
    check_output(args.out_dir, "--out_dir", "folder")  # before any page is drawn
    rows = make_train_rows(topics, args.train_pages, geometries, args.seed, progress, args.workers)
    train_path = write_train(os.path.join(args.out_dir, "train"), rows, args)
    corpus, queries, qrels = make_eval_rows(topics, eval_pages, geometries, args.seed, progress, args.workers)
    write_eval(os.path.join(args.out_dir, "eval"), corpus, queries, qrels, args)
    per_topic = args.train_pages / args.topics
    print(f"wrote {len(rows)} training pages ({args.topics} topics, {per_topic:.1f} pages each) to {train_path}")
    print(f"wrote {len(corpus)} eval pages and {len(queries)} queries to {os.path.join(args.out_dir, 'eval')}")


# -----------------------------------------------------------------------------
# Keyword pages: one word on a blank page, the tests' and benches' page (a tiny model learns them in a few steps)

# distinct, one-token-ish words: a test takes the first N it needs
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "ocean",
    "maple",
    "robot",
    "zebra",
    "candle",
    "forest",
    "rocket",
    "violin",
    "desert",
    "garden",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "magnet",
    "needle",
    "orange",
    "pepper",
    "quartz",
    "saddle",
    "tunnel",
    "walnut",
    "yogurt",
    "bridge",
    "castle",
]


def render_keyword_page(keyword: str, size=(224, 224), variant: int = 0) -> Image.Image:
    """A page whose only content that matters is `keyword`, drawn at a position snapped to the 28 px token grid
    (a frozen random vision tower has no shift invariance), with a variant-dependent grey level as noise
    (variant 0: white)."""
    page = Image.new("RGB", size, (255 - 3 * (variant % 5),) * 3)
    draw = ImageDraw.Draw(page)
    draw.text((28, 28), keyword, fill="black", font=ImageFont.load_default(size=40))
    return page


if __name__ == "__main__":
    run_cli(main, parse_args())
