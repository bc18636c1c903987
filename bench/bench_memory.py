r"""Memory of every InternVL3.5 size: parameters per part, backbone weights in bf16 / 8-bit / 4-bit, and an estimate
of what one training step at train.py's default micro-batch needs on a GPU, against 24 / 48 / 80 / 141 GB cards.

    python bench/bench_memory.py                   # every size, on the meta device: no memory, ~20 s
    python bench/bench_memory.py --verify 1b       # + load it quantised on the CPU, compare bytes (1b: ~2 min)

Each size is make_tiny_model.py's InternVLModel at the real shapes (InternViT-300M or -6B + MLP projector + Qwen3),
built with `torch.device("meta")`, so parameters are counted, never allocated. InternVLModel has no LM head: every
count here is the published total less vocab x hidden (the -HF checkpoints' lm_head is not loaded). Parts:
  vision     the vision tower (stays bf16);   projector  the MLP projector (stays bf16);
  LM linear  the nn.Linear layers inside the language model's decoder layers: what bitsandbytes quantises when the
             language model is loaded with BitsAndBytesConfig(llm_int8_skip_modules=["vision_tower",
             "multi_modal_projector"]) (the only Linear layers of the language model; embeddings and norms stay bf16);
  LM rest    the token embeddings and the RMSNorm weights (stay bf16).

Bytes of one quantised Linear(in, out), n = in x out weights, read from bitsandbytes 0.50 (functional.py):
  8-bit (LLM.int8, Int8Params / int8_vectorwise_quant): the int8 weight, n bytes, + one fp32 scale per output row
        (SCB), 4 x out bytes;
  4-bit (NF4, double quantisation, quantize_4bit with compress_statistics): two weights a byte, ceil(n / 2); one
        absmax per block of 64 weights, itself quantised to 8 bits (quantize_blockwise, blocksize 256), ceil(n / 64)
        bytes; for those, one fp32 absmax per 256 blocks, 4 x ceil(ceil(n / 64) / 256) bytes; and per layer the
        fp32 offset (4 B), the 8-bit dynamic code of the nested quantiser (256 x fp32) and the NF4 code (16 x fp32).
  So 8-bit is ~1 byte a weight, NF4 + double quantisation 0.5 + 1/64 + 4/16384 = 0.5159 bytes (4.127 bits).
Biases of quantised layers (Qwen3 has none) and everything else stay bf16; buffers (rotary inv_freq) are counted
at their own dtype. GB here is 10^9 bytes.

--verify SIZE builds that size for real (make_tiny_model.build, random weights, 1b: ~3.6 GB in fp32), saves it in bf16
to a temporary folder and loads it back through AutoModel.from_pretrained three times: bf16, 8-bit and 4-bit (the
BitsAndBytesConfig above); it checks that exactly the LM linear layers were quantised and compares the bytes of every
tensor the loaded model holds (parameters, buffers, and the quantisation state bitsandbytes keeps outside them:
SCB, absmax, nested absmax and codes; each storage once) with the formula. transformers' get_memory_footprint()
(parameters + buffers only) is printed beside it. Needs bitsandbytes, and RAM for the fp32 model (1b: 3.6 GB) and
its bf16 copy.

Activations: what autograd keeps for the backward pass, per token per decoder layer, counted on the meta device
(no memory, no compute): one decoder layer at the size's shapes, wrapped by ColIntern with LoRA as train.py --lora
does (fp32 adapters computing in bf16, with LoraSettings' dropout, over a bf16 backbone, as on a GPU), encodes one
sequence of ACT_TOKENS tokens under torch.autograd.graph.saved_tensors_hooks; every saved storage counts once,
parameters and the (tokens x tokens) attention matrices left out (the meta device runs the math attention path; GPU
SDPA kernels keep no such matrix). Without checkpointing a token keeps that in every layer; with
--gradient_checkpointing each layer
keeps its input (hidden x 2 bytes a token) and one layer's worth is live again while it is recomputed in the
backward pass. The same count at 1B shapes with an fp32 backbone and no dropout is checked against what
bench_train.py measured on CPU (MEASURED_1B: the memory a step adds a query with its page); where the measurement is
the larger (the backward pass's gradients and temporaries), that ratio multiplies every activation estimate.

The training estimate (one optimizer step of train.py --lora --gradient_checkpointing on a CUDA GPU; computed, not
measured on a GPU) adds up: the weights; LoRA (r x (in + out) on every LM linear) and the two heads in fp32 with
their gradients and paged_adamw_8bit's two 8-bit moments, 4 + 4 + 2 bytes a trainable parameter; the activations of
one micro-batch of --batch_size queries with (1 + --num_negs) pages each, --query_tokens + (1 + num_negs) x
(--tiles x 256 + --page_text_tokens) tokens a query (pages padded to the longest: all at --tiles). The vision tower
runs without a graph: its per-layer peak over the micro-batch's tiles (3 x hidden + intermediate bf16 values a
token, 1025 tokens a tile) comes before the language model's and counts only if larger. A card fits when the
estimate stays under 90% of its nominal size less 1 GB (CUDA context, kernels' workspace, allocator slack).
"""

import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import make_tiny_model  # noqa: E402
import train  # noqa: E402
from colintern_cli import ArgumentParser, run_cli  # noqa: E402
from colintern_model import ColIntern, LoraSettings, lora_parameters  # noqa: E402

REAL_SIZES = ("1b", "2b", "4b", "8b", "14b", "38b")
MODES = ("bf16", "8bit", "4bit")
SKIP_MODULES = ["vision_tower", "multi_modal_projector"]  # stay bf16 under BitsAndBytesConfig
# bitsandbytes' storage (see the module docstring)
NF4_BLOCK = 64  # weights per absmax (quantize_4bit's default blocksize)
NESTED_BLOCK = 256  # absmax values per fp32 scale of the double quantisation (quantize_blockwise in quantize_4bit)
NF4_LAYER_BYTES = 4 + 256 * 4 + 16 * 4  # offset + nested dynamic code + NF4 code, one set per quantised layer
BF16 = 2
# What bench_train.py measured at 1B shapes on CPU (fp32 backbone, LoRA r 32 without dropout, 1-tile pages of 264
# tokens, queries of 25): the memory one plain step adds, a query with its page, from the differences between two
# batch sizes, without and with --gradient_checkpointing (the runs and their commands: docs/benchmarks.md).
MEASURED_1B = dict(query_tokens=25, page_tokens=264, plain_mib=(6541 - 3313) / 4, checkpointing_mib=(321 - 146) / 3)
ACT_TOKENS = 97  # tokens of the counted sequence: a prime, so no weight dimension equals it
TILE_TOKENS = 256  # language-model tokens a 448 px tile (pixel shuffle 0.5 of 32 x 32 patches)
VIT_TILE_TOKENS = 1025  # vision-tower tokens a tile (32 x 32 patches + class token)
CARDS = ((24, "24 GB"), (48, "48 GB"), (80, "H100 80 GB"), (141, "H200 141 GB"))
CARD_RESERVE_GB = 1.0
CARD_USABLE = 0.9
GB = 1e9


@dataclass
class Parts:
    """Parameter counts of an InternVLModel, and the shapes of the layers bitsandbytes quantises."""

    vision: int
    projector: int
    lm_linear: int  # weights + biases of the Linear layers inside language_model.layers
    lm_rest: int  # embeddings + norms
    linears: list  # (in_features, out_features, has_bias) of each of those Linear layers
    buffer_bytes: int
    hidden: int
    layers: int
    vision_hidden: int
    vision_intermediate: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.lm_linear + self.lm_rest


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parts(model) -> Parts:
    """Parameters per part of an InternVLModel (on any device, meta included)."""
    lm = model.language_model
    linears = [m for m in lm.layers.modules() if isinstance(m, torch.nn.Linear)]
    lm_linear = sum(numel(m) for m in linears)
    cfg = model.config
    return Parts(
        vision=numel(model.vision_tower),
        projector=numel(model.multi_modal_projector),
        lm_linear=lm_linear,
        lm_rest=numel(lm) - lm_linear,
        linears=[(m.in_features, m.out_features, m.bias is not None) for m in linears],
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        hidden=cfg.text_config.hidden_size,
        layers=cfg.text_config.num_hidden_layers,
        vision_hidden=cfg.vision_config.hidden_size,
        vision_intermediate=cfg.vision_config.intermediate_size,
    )


def meta_parts(size: str) -> Parts:
    with torch.device("meta"):
        model, _ = make_tiny_model.build(size, tile=448)
    return count_parts(model)


def int8_bytes(n_in: int, n_out: int) -> int:
    return n_in * n_out + 4 * n_out


def nf4_bytes(n_in: int, n_out: int) -> int:
    n = n_in * n_out
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NF4_LAYER_BYTES


def weight_bytes(parts: Parts, mode: str) -> int:
    """Bytes of the backbone's weights with its language model's linear layers in `mode` (bf16, 8bit, 4bit)."""
    kept = BF16 * (parts.vision + parts.projector + parts.lm_rest) + parts.buffer_bytes
    if mode == "bf16":
        return kept + BF16 * parts.lm_linear
    per_layer = {"8bit": int8_bytes, "4bit": nf4_bytes}[mode]
    return kept + sum(per_layer(i, o) + (BF16 * o if bias else 0) for i, o, bias in parts.linears)


@dataclass
class Workload:
    batch_size: int
    num_negs: int
    tiles: int
    page_text_tokens: int
    query_tokens: int
    lora_r: int
    proj_dim: int = 128

    @property
    def page_tokens(self) -> int:
        return self.tiles * TILE_TOKENS + self.page_text_tokens

    @property
    def tokens_per_query(self) -> int:
        """Language-model tokens one query brings into a micro-batch: itself and its pages."""
        return self.query_tokens + (1 + self.num_negs) * self.page_tokens


def trainable_params(parts: Parts, work: Workload) -> int:
    lora = work.lora_r * sum(i + o for i, o, _ in parts.linears)
    heads = 2 * (parts.hidden * work.proj_dim + work.proj_dim)
    return lora + heads


def one_layer_backbone(size: str, dtype: torch.dtype):
    """An InternVLModel on the meta device whose language model has `size`'s layer shapes but one decoder layer
    (and a 16-token vocabulary, a tiny vision tower): what a layer keeps for backward does not depend on the rest."""
    from transformers import InternVLConfig, InternVLModel, InternVLVisionConfig, Qwen3Config

    text = Qwen3Config(**{**make_tiny_model.SIZES[size]["text"], "num_hidden_layers": 1}, vocab_size=16)
    vision = InternVLVisionConfig(image_size=448, patch_size=14, **make_tiny_model.SIZES["tiny"]["vision"])
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=1, image_seq_length=256)
    with torch.device("meta"):
        return InternVLModel(config).to(dtype)


def layer_activation_bytes(size: str, lora: LoraSettings, dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes autograd keeps for backward per token per decoder layer of `size`'s language model with LoRA, the
    backbone in `dtype` (see the module docstring; the final norm's, one per model, is counted with the layer)."""
    model = ColIntern(one_layer_backbone(size, dtype), lora=lora).train()
    lm = model.backbone.language_model
    if model.compute_dtype != torch.float32:
        # LoRA computes in the backbone's dtype under autocast (ColIntern.compute_precision), which the meta device
        # does not run: the adapters are cast instead, which saves the same per-token tensors (autocast's casts of
        # the weights are per layer, not per token)
        for p in lora_parameters(model).values():
            p.data = p.data.to(dtype)
    # A storage's id: meta tensors have no data pointer; _cdata is the address of the StorageImpl, kept unique
    # because `held` keeps every saved tensor alive while counting.
    skip = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    kept, held = {}, []

    def pack(t):
        held.append(t)
        storage = t.untyped_storage()
        if storage._cdata not in skip and tuple(t.shape[-2:]) != (ACT_TOKENS, ACT_TOKENS):
            kept[storage._cdata] = storage.nbytes()
        return t

    embeds = torch.zeros(1, ACT_TOKENS, lm.config.hidden_size, dtype=dtype, device="meta")
    mask = torch.zeros(1, 1, ACT_TOKENS, ACT_TOKENS, dtype=dtype, device="meta")  # 4-D: no data-dependent checks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    return sum(kept.values()) / ACT_TOKENS


def activation_bytes(
    parts: Parts, per_token_layer: float, tokens: int, checkpointing: bool, input_bytes: int = BF16
) -> float:
    """Language-model activations kept over `tokens` tokens: every layer's, or with checkpointing every layer's
    input plus one layer's while it is recomputed."""
    if not checkpointing:
        return per_token_layer * parts.layers * tokens
    return (parts.hidden * input_bytes * parts.layers + per_token_layer) * tokens


def calibration(parts_1b: Parts, lora: LoraSettings) -> dict:
    """The count at bench_train.py's measured setting (1B, fp32 backbone, LoRA without dropout) against the
    measurement: MiB a query with its page, counted and measured, with and without checkpointing."""
    per = layer_activation_bytes("1b", LoraSettings(r=lora.r, alpha=lora.alpha, dropout=0.0), torch.float32)
    tokens = MEASURED_1B["query_tokens"] + MEASURED_1B["page_tokens"]
    counted = {ckpt: activation_bytes(parts_1b, per, tokens, ckpt, input_bytes=4) / 2**20 for ckpt in (False, True)}
    return dict(
        per_token_layer=per,
        plain=(counted[False], MEASURED_1B["plain_mib"]),
        checkpointing=(counted[True], MEASURED_1B["checkpointing_mib"]),
        margin=max(1.0, MEASURED_1B["plain_mib"] / counted[False], MEASURED_1B["checkpointing_mib"] / counted[True]),
    )


def vision_peak_bytes(parts: Parts, work: Workload) -> float:
    tiles = work.batch_size * (1 + work.num_negs) * work.tiles
    return tiles * VIT_TILE_TOKENS * (3 * parts.vision_hidden + parts.vision_intermediate) * BF16


def step_bytes(
    parts: Parts, per_token_layer: float, margin: float, work: Workload, mode: str, checkpointing: bool = True
) -> dict:
    weights = weight_bytes(parts, mode)
    trainable = trainable_params(parts, work) * (4 + 4 + 2)
    lm = margin * activation_bytes(parts, per_token_layer, work.batch_size * work.tokens_per_query, checkpointing)
    activations = max(lm, vision_peak_bytes(parts, work))
    return dict(weights=weights, trainable=trainable, activations=activations, total=weights + trainable + activations)


def smallest_card(total_gb: float) -> str:
    for gb, name in CARDS:
        if total_gb <= (gb - CARD_RESERVE_GB) * CARD_USABLE:
            return f"{name} ({gb - total_gb:.0f} GB left)"
    return "none: split it (--device_map auto)"


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def print_tables(sizes, work: Workload) -> dict:
    parts = {s: meta_parts(s) for s in sizes}
    print(
        "| size | vision | projector | LM linear (quantised) | LM embeddings + norms | total | bf16 | 8-bit | 4-bit |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s, p in parts.items():
        memory = " | ".join(f"{weight_bytes(p, m) / GB:.2f} GB" for m in MODES)
        print(
            f"| {s.upper()} | {fmt_params(p.vision)} | {fmt_params(p.projector)} | {fmt_params(p.lm_linear)} | "
            f"{fmt_params(p.lm_rest)} | {fmt_params(p.total)} | {memory} |"
        )

    lora = LoraSettings(r=work.lora_r, alpha=work.lora_r)
    cal = calibration(parts.get("1b") or meta_parts("1b"), lora)
    act = {s: layer_activation_bytes(s, lora) for s in parts}
    print()
    print(
        f"Activations a decoder layer keeps per token (bf16 backbone, LoRA r {lora.r} dropout {lora.dropout} in bf16, "
        f"counted on the meta device), and per {work.page_tokens}-token page ({work.tiles} tiles) / "
        f"{work.query_tokens}-token query over all layers, x{cal['margin']:.2f} (measured / counted at 1B, if "
        f"above 1):"
    )
    print()
    print(
        "| size | hidden x layers | per token per layer | page, no checkpointing | page, checkpointing | "
        "query, no checkpointing | query, checkpointing |"
    )
    print("|---|---|---|---|---|---|---|")
    for s, p in parts.items():
        cells = [
            cal["margin"] * activation_bytes(p, act[s], tokens, ckpt) / 2**20
            for tokens in (work.page_tokens, work.query_tokens)
            for ckpt in (False, True)
        ]
        print(
            f"| {s.upper()} | {p.hidden} x {p.layers} | {act[s] / 1024:.0f} KiB = {act[s] / p.hidden:.0f} B x "
            f"hidden | " + " | ".join(f"{c:,.0f} MiB" if c >= 10 else f"{c:.1f} MiB" for c in cells) + " |"
        )
    print()
    (plain_c, plain_m), (ckpt_c, ckpt_m) = cal["plain"], cal["checkpointing"]
    print(
        f"check at 1B, fp32 backbone, LoRA without dropout ({cal['per_token_layer'] / 1024:.1f} KiB a token a "
        f"layer), a query + page of {MEASURED_1B['query_tokens']} + {MEASURED_1B['page_tokens']} tokens: counted "
        f"{plain_c:.0f} MiB, measured {plain_m:.0f} MiB without checkpointing (x{plain_m / plain_c:.2f}); counted "
        f"{ckpt_c:.1f} MiB, measured {ckpt_m:.1f} MiB with it (x{ckpt_m / ckpt_c:.2f})"
    )
    print()
    print(
        f"One training step (--lora --gradient_checkpointing), micro-batch {work.batch_size} queries x "
        f"({work.query_tokens} query + {1 + work.num_negs} x {work.page_tokens} page tokens = "
        f"{work.tokens_per_query}); GB, then the smallest card it fits (under {CARD_USABLE:.0%} of its size less "
        f"{CARD_RESERVE_GB:.0f} GB):"
    )
    print()
    print(
        "| size | LoRA + heads (fp32, grads, 8-bit Adam) | activations (without checkpointing) | bf16 backbone | "
        "8-bit backbone | 4-bit backbone |"
    )
    print("|---|---|---|---|---|---|")
    for s, p in parts.items():
        cells = []
        for m in MODES:
            total = step_bytes(p, act[s], cal["margin"], work, m)["total"] / GB
            cells.append(f"{total:.1f} -> {smallest_card(total)}")
        est = step_bytes(p, act[s], cal["margin"], work, "bf16")
        plain = step_bytes(p, act[s], cal["margin"], work, "bf16", checkpointing=False)["activations"]
        print(
            f"| {s.upper()} | {est['trainable'] / GB:.2f} | {est['activations'] / GB:.1f} ({plain / GB:.0f}) | "
            + " | ".join(cells)
            + " |"
        )
    return parts


# -----------------------------------------------------------------------------
# --verify: quantise one size for real on the CPU


def bnb_config(mode: str):
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=SKIP_MODULES,
    )


def held_bytes(model) -> int:
    """Bytes of every tensor the model holds: parameters, buffers and bitsandbytes' quantisation state (SCB; absmax,
    offset, code and the nested state), each storage counted once."""
    import bitsandbytes as bnb

    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            tensors.append(module.weight.SCB)
        elif isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            tensors += [state.absmax, state.code, state.offset]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def quantised_names(model) -> set:
    import bitsandbytes as bnb

    return {name for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def verify(size: str, work_dir: str | None) -> dict:
    """-> {mode: (bytes held by the loaded model, formula bytes)}; raises if bitsandbytes quantised other layers."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("--verify needs bitsandbytes: pip install bitsandbytes")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    model, _ = make_tiny_model.build(size, tile=448)
    parts = count_parts(model)
    expected_linear = {
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("language_model.layers.")
    }
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        model.to(torch.bfloat16).save_pretrained(folder)
        del model
        results = {}
        print(f"verify {size}: built and saved in bf16 in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode in MODES:
            t = time.perf_counter()
            kwargs = {} if mode == "bf16" else {"quantization_config": bnb_config(mode)}
            loaded = AutoModel.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
            names = quantised_names(loaded)
            if mode != "bf16" and names != expected_linear:
                raise RuntimeError(
                    f"{mode}: bitsandbytes quantised {len(names)} modules, expected the "
                    f"{len(expected_linear)} LM linear layers; differing: "
                    f"{sorted(names ^ expected_linear)[:5]}"
                )
            measured, footprint, formula = held_bytes(loaded), loaded.get_memory_footprint(), weight_bytes(parts, mode)
            which = "nothing quantised" if mode == "bf16" else f"the {len(names)} LM linear layers quantised, no other"
            print(
                f"verify {size} {mode:4s}: {which}; held tensors {measured:,} B, formula {formula:,} B, difference "
                f"{measured - formula:+,} B ({(measured - formula) / formula:+.4%}); get_memory_footprint() "
                f"{footprint:,} B (no quantisation state); {time.perf_counter() - t:.0f} s",
                flush=True,
            )
            results[mode] = (measured, formula)
            del loaded
    return results


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--sizes",
        default=",".join(REAL_SIZES),
        help=f"comma-separated sizes from make_tiny_model.SIZES ({', '.join(make_tiny_model.SIZES)})",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=train.build_parser().get_default("batch_size"),
        help="queries per micro-batch for the training estimate (train.py's default)",
    )
    p.add_argument("--num_negs", type=int, default=0, help="hard negatives per query (train.py with --train_hub: 0)")
    p.add_argument(
        "--tiles",
        type=int,
        default=5,
        help="tiles per page (train.py's default --max_tiles 4 + the thumbnail: 5, 1,280 image tokens)",
    )
    p.add_argument(
        "--page_text_tokens",
        type=int,
        default=8,
        help="page tokens besides the image's (prompt, <img> </img>; 8 in bench_train.py's pages)",
    )
    p.add_argument(
        "--query_tokens",
        type=int,
        default=30,
        help="tokens per query (prefix + text + 10 augmentation tokens; bench_train.py's are 25)",
    )
    p.add_argument("--lora_r", type=int, default=LoraSettings().r, help="LoRA rank (colintern_model's default)")
    p.add_argument(
        "--verify",
        default=None,
        metavar="SIZE",
        help="also build SIZE for real, load it bf16 / 8-bit / 4-bit on the CPU through bitsandbytes and "
        "compare the bytes held with the formula (1b: ~2 min on 2 cores, ~6 GB RAM)",
    )
    p.add_argument("--work_dir", default=None, help="where --verify saves its temporary checkpoint (default: TMPDIR)")
    args = p.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes + ([args.verify] if args.verify else []) if s not in make_tiny_model.SIZES]
    if bad:
        p.error(f"unknown size(s) {bad}: choose from {', '.join(make_tiny_model.SIZES)}")
    if args.batch_size < 1 or args.tiles < 1 or args.num_negs < 0 or args.lora_r < 1:
        p.error("--batch_size, --tiles and --lora_r must be >= 1, --num_negs >= 0")
    args.sizes = sizes
    return args


def main(args):
    work = Workload(
        batch_size=args.batch_size,
        num_negs=args.num_negs,
        tiles=args.tiles,
        page_text_tokens=args.page_text_tokens,
        query_tokens=args.query_tokens,
        lora_r=args.lora_r,
    )
    print_tables(args.sizes, work)
    if args.verify:
        print()
        verify(args.verify, args.work_dir)


if __name__ == "__main__":
    run_cli(main, parse_args())
