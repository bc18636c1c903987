"""Build a randomly initialised InternVL3.5-style checkpoint offline and save it with `save_pretrained`.

    python make_tiny_model.py --out_dir outputs/tiny-internvl        # ~0.15M params, for tests and the demo
    python make_tiny_model.py --out_dir outputs/internvl3_5-1b-random --size 1b   # real 1B shapes, for GPU benchmarks

The folder holds config, weights, tokenizer and processor exactly as a hub checkpoint does, so
`colintern_model.load_backbone(DIR)` loads it through the same `AutoModel` / `AutoProcessor` path as
`OpenGVLab/InternVL3_5-1B-HF`. Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few
sentences, and the weights are random (seeded).
"""

import json

import torch

from colintern_cli import ArgumentParser, UserValueError, run_cli
from colintern_data import check_output, follow_umask

# The special tokens InternVL's processor needs, named as in the real -HF tokenizer.
SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
PAD_TOKEN = "<|endoftext|>"

# Enough text for the BPE to learn English words; every other string still tokenizes (byte-level).
TOKENIZER_CORPUS = [
    "Which page is about the keyword? Find the page that shows the table, the chart and the title.",
    "Query: what is the revenue in the annual report of the company for the year?",
    "Describe the page. The document contains paragraphs, figures, tables and bar charts.",
    "the quick brown fox jumps over the lazy dog 0123456789 percent total growth market",
] * 20

# Real InternVL3.5 shapes, for measuring speed and memory without a download: InternViT-300M (1B-14B) or InternViT-6B
# (38B) + an MLP projector + Qwen3-0.6B / 1.7B / 4B / 8B / 14B / 32B. InternVLModel has no LM head, so each size here
# has vocab x hidden fewer parameters than its published total (bench/bench_memory.py counts every part).
VIT_300M = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, attention_bias=True
)  # InternViT-300M-448px-V2_5: qkv_bias
VIT_6B = dict(
    hidden_size=3200,
    num_hidden_layers=45,
    num_attention_heads=25,
    intermediate_size=12800,
    attention_bias=False,
    use_qk_norm=True,
    norm_type="rms_norm",
)  # InternViT-6B-448px-V2_5


def qwen3(hidden, intermediate, layers, heads, kv_heads=8):
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=128,
    )


SIZES = {
    "tiny": dict(
        vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
        vocab_size=None,  # the trained tokenizer's size
    ),
    "1b": dict(vision=VIT_300M, text=qwen3(1024, 3072, 28, 16), vocab_size=151936),  # Qwen3-0.6B
    "2b": dict(vision=VIT_300M, text=qwen3(2048, 6144, 28, 16), vocab_size=151936),  # Qwen3-1.7B
    "4b": dict(vision=VIT_300M, text=qwen3(2560, 9728, 36, 32), vocab_size=151936),  # Qwen3-4B
    "8b": dict(vision=VIT_300M, text=qwen3(4096, 12288, 36, 32), vocab_size=151936),  # Qwen3-8B
    "14b": dict(vision=VIT_300M, text=qwen3(5120, 17408, 40, 40), vocab_size=151936),  # Qwen3-14B
    "38b": dict(vision=VIT_6B, text=qwen3(5120, 25600, 64, 64), vocab_size=151936),  # Qwen3-32B
}


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[PAD_TOKEN],
        show_progress=False,
    )
    bpe.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    state = json.loads(bpe.model.__getstate__())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=PAD_TOKEN,
        eos_token=PAD_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def build(size: str = "tiny", tile: int = 224, seed: int = 0):
    """Return (model, processor) for a random InternVL of the given size; `tile` is the image tile side in pixels."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLModel,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen3Config,
    )

    if size not in SIZES:
        raise UserValueError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    if tile % 28:
        raise UserValueError(f"--tile must be a multiple of 28 (patch 14 x pixel-shuffle 2), got {tile}")
    spec = SIZES[size]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    image_seq_length = (tile // 14) ** 2 // 4
    vision = InternVLVisionConfig(image_size=tile, patch_size=14, **spec["vision"])
    vocab_size = spec["vocab_size"] or len(tokenizer)
    text = Qwen3Config(
        vocab_size=vocab_size,
        max_position_embeddings=40960,
        rope_theta=1e6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        **spec["text"],
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
    )
    model = InternVLModel(config).eval()
    image_processor = GotOcr2ImageProcessor(
        size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=12
    )
    video_processor = InternVLVideoProcessor(size={"height": tile, "width": tile})
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
    )
    return model, processor


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--out_dir",
        "--out",
        dest="out_dir",
        required=True,
        help="folder to write the checkpoint into (created; existing files replaced)",
    )
    p.add_argument(
        "--size",
        default="tiny",
        choices=sorted(SIZES),
        help="'tiny': ~0.15M params for CPU tests; the others: InternVL3.5-1B/2B/4B/8B/14B/38B shapes, "
        "random weights (InternVLModel, no LM head: 1b has 0.91B params, 1.06B published with its LM "
        "head); python bench/bench_memory.py lists every size's parameters and weight memory",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="image tile side in pixels (multiple of 28); default 224 for tiny, 448 (the real one) for the real sizes",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    return p.parse_args(argv)


def main(args):
    tile = args.tile or (224 if args.size == "tiny" else 448)
    check_output(args.out_dir, "--out_dir", "folder")  # before building: a 38B takes minutes
    model, processor = build(args.size, tile, args.seed)
    model.save_pretrained(args.out_dir)
    processor.save_pretrained(args.out_dir)
    follow_umask(args.out_dir)  # safetensors writes model.safetensors 0600
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.size} InternVL ({n_params / 1e6:.2f}M params, tile {tile}px) to {args.out_dir}")


if __name__ == "__main__":
    run_cli(main, parse_args())
