"""Keyword pages: the one page renderer and word list of the tests (through conftest) and of bench/bench_train.py.
No pytest here, so that a bench script can import it (`sys.path` + tests/)."""

from PIL import Image, ImageDraw, ImageFont

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
