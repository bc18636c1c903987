"""Does sorting pages by tile count before batching pay? Page encoding pads every page of a batch (on the left) to
the longest, and the padded tokens run through every layer of the language model. This counts, for a corpus of page
shapes, the language-model tokens (and attention's token pairs) that batches in corpus order run, against batches
of pages sorted by length, each as a multiple of the real tokens. It needs no model: the tile counts come from
ColInternProcessor's own tiling of blank pages of each shape.

    python bench/bench_padding.py                          # three corpora, batches 8 and 32, --max_tiles 4
    python bench/bench_padding.py --max_tiles 6 --batch_sizes 16

The vision tower is not affected (it runs over tiles, never padded), nor is training's contrastive batch, whose
composition the sampler fixes. Token counts are exact; what they cost in time on a GPU (and whether a padded batch
loses SDPA's flash kernel to its 4-D mask as well) needs a GPU run.
"""

import argparse
import os
import random
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import make_tiny_model  # noqa: E402
from colintern_model import ColInternProcessor  # noqa: E402

SHAPES = {
    "portrait A4": (1240, 1754),
    "landscape A4": (1754, 1240),
    "slide 16:9": (1920, 1080),
    "square": (1000, 1000),
    "tall infographic": (800, 2400),
}
CORPORA = {
    "documents (70% portrait A4, 20% slides, 10% square)": {"portrait A4": 0.7, "slide 16:9": 0.2, "square": 0.1},
    "an even mix of the five shapes": {k: 0.2 for k in SHAPES},
    "portrait A4 only": {"portrait A4": 1.0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_tiles", type=int, default=4, help="as train.py / mine_hard_negatives.py --max_tiles")
    p.add_argument("--batch_sizes", default="8,32", help="comma-separated page batch sizes (mining's --doc_batch)")
    p.add_argument("--pages", type=int, default=4096, help="pages drawn per corpus (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    return p.parse_args(argv)


def page_tokens(processor: ColInternProcessor, size: tuple) -> int:
    """Sequence length of one page of this shape: its processed input_ids (tiles x image tokens + the prompt)."""
    return processor.process_pages([Image.new("RGB", size, "white")])["input_ids"].shape[1]


def padded_cost(lengths: list, batch: int, power: int = 1) -> float:
    """Sum over batches of batch size x longest^power, over the sum of length^power: the factor padding costs."""
    real = sum(n**power for n in lengths)
    run = sum(len(lengths[i : i + batch]) * max(lengths[i : i + batch]) ** power for i in range(0, len(lengths), batch))
    return run / real


def main(args):
    # the tiny processor tiles as the real one does (the same grid choice); lengths scale to 448 px tiles below
    _, hf_processor = make_tiny_model.build("tiny", tile=224, seed=0)
    processor = ColInternProcessor(hf_processor, max_tiles=args.max_tiles)
    tile_tokens = hf_processor.image_seq_length
    prompt = page_tokens(processor, (10, 10)) - tile_tokens  # a one-tile page: the prompt's own tokens
    tiles = {k: (page_tokens(processor, (w // 4, h // 4)) - prompt) // tile_tokens for k, (w, h) in SHAPES.items()}
    print(
        f"tiles a page at --max_tiles {args.max_tiles} (thumbnail included): "
        + ", ".join(f"{k} {t}" for k, t in tiles.items())
    )
    rng = random.Random(args.seed)
    for name, mix in CORPORA.items():
        drawn = rng.choices(list(mix), weights=list(mix.values()), k=args.pages)
        lengths = [tiles[k] * 256 + prompt for k in drawn]  # 256 image tokens a 448 px tile
        for b in (int(x) for x in args.batch_sizes.split(",")):
            print(
                f"{name}, batch {b}: language-model tokens run / real: corpus order {padded_cost(lengths, b):.3f}, "
                f"sorted {padded_cost(sorted(lengths), b):.3f}; attention pairs {padded_cost(lengths, b, 2):.3f} "
                f"vs {padded_cost(sorted(lengths), b, 2):.3f}"
            )


if __name__ == "__main__":
    main(parse_args())
