"""ColIntern: InternVL3.5 as a ColPali-style late-interaction page retriever.

Everything the scripts share, in pipeline order:
    load backbone -> process inputs -> encode (ColIntern) -> score (MaxSim) -> loss -> checkpoint.

    from colintern_model import ColIntern, LoraSettings, maxsim_scores, save_checkpoint
    model, processor = ColIntern.from_pretrained("OpenGVLab/InternVL3_5-1B-HF", lora=LoraSettings())
    q = model.encode_queries(processor, ["Which page shows revenue?"])      # list of (Lq, D)
    p = model.encode_pages(processor, [Image.open("page.png")])             # list of (Lp, D)
    scores = maxsim_scores(q, p)                                            # (Nq, Np)
    save_checkpoint("ck.pt", model)                                         # heads + LoRA
    model, processor, ckpt = ColIntern.from_checkpoint("ck.pt")
"""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import threading
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from colintern_cli import UserFileNotFoundError, UserOSError, UserRuntimeError, UserValueError, progress_bar
from colintern_data import (
    atomic_path,
    backbone_fingerprint,
    local_checkpoint,
    looks_like_local_path,
    open_image,
    write_json,
)

DEFAULT_MODEL_ID = "OpenGVLab/InternVL3_5-1B-HF"

# bitsandbytes (imported by peft and by the 8-bit optimizers) logs a warning at import on CPUs with AVX512-BF16 when
# the optional hub-kernel package `kernels` is missing; it then uses its own CPU kernel, so the message is noise for
# every script run. Drop that one record; every other bitsandbytes warning still reaches the user.
BNB_OPTIONAL_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith(BNB_OPTIONAL_KERNEL_WARNING)
)
# An 8-bit (LLM.int8) matmul quantises its input through fp16 whatever the compute dtype, and bitsandbytes logs that
# cast at every call of every layer for a bf16 input. The cast is the method, not a fault: the vision tower and the
# rest of a --quantize 8bit backbone stay bf16 (an fp16 backbone would need loss scaling), so drop that one record.
BNB_INT8_CAST_WARNING = "MatMul8bitLt: inputs will be cast from"
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: not str(record.msg).startswith(BNB_INT8_CAST_WARNING)
)

# -----------------------------------------------------------------------------
# Backbone loading

REMOTE_CODE_SUFFIXES = re.compile(r"-(Instruct|Pretrained|MPO|Flash)$")
# OpenGVLab's InternVL3.5 hub ids: the HF-native (transformers) checkpoints end in -HF, all others are remote code
INTERNVL3_5_HUB_ID = re.compile(r"OpenGVLab/InternVL3_5-[^/]+", re.IGNORECASE)


def hf_id_for(model_id: str) -> str:
    """The HF-native checkpoint that matches a remote-code InternVL id (e.g. ...-1B-Instruct -> ...-1B-HF)."""
    return REMOTE_CODE_SUFFIXES.sub("", model_id.rstrip("/")) + "-HF"


def check_model_id(model_id: str) -> None:
    """Refuse a remote-code InternVL3.5 hub id by its name, before any download (online or offline alike); a local
    folder is checked by its config.json instead (check_internvl_config)."""
    name = model_id.rstrip("/")
    if looks_like_local_path(model_id) or not INTERNVL3_5_HUB_ID.fullmatch(name) or name.upper().endswith("-HF"):
        return
    raise UserValueError(
        f"{model_id!r} is a remote-code InternVL checkpoint (InternVLChatModel); ColIntern needs the "
        f"HF-native transformers checkpoint: use {hf_id_for(model_id)!r} instead"
    )


def read_model_config(model_id: str) -> dict:
    """config.json of a local folder or a hub id, as a plain dict (no model code is imported or run)."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, "config.json")
        if not os.path.isfile(path):
            raise UserFileNotFoundError(
                f"model folder {model_id!r} has no config.json: is it a save_pretrained folder?"
            )
    elif looks_like_local_path(model_id):
        raise UserFileNotFoundError(
            f"model folder {model_id!r} does not exist. Pass a hub id such as {DEFAULT_MODEL_ID!r} or a folder "
            f"written by save_pretrained (for an offline tiny model: python make_tiny_model.py --out_dir DIR)"
        )
    else:
        check_model_id(model_id)
        from transformers.utils import cached_file

        try:
            path = cached_file(model_id, "config.json")
        except OSError as e:
            raise UserOSError(
                f"could not fetch config.json of {model_id!r} from the Hugging Face hub ({e}). Offline? "
                f"Download it once with `hf download {model_id}` or pass a local folder."
            ) from e
    with open(path) as f:
        return json.load(f)


def check_internvl_config(model_id: str, config: dict) -> None:
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        raise UserValueError(
            f"{model_id!r} is a remote-code InternVL checkpoint (model_type 'internvl_chat', InternVLChatModel). "
            f"ColIntern needs the HF-native transformers checkpoint: use {hf_id_for(model_id)!r} instead."
        )
    if model_type != "internvl":
        raise UserValueError(
            f"{model_id!r} has model_type {model_type!r}; ColIntern needs an HF-native InternVL3.5 "
            f"checkpoint (model_type 'internvl'), e.g. {DEFAULT_MODEL_ID!r}"
        )


def resolve_dtype(dtype, device="cpu", quantize="none") -> torch.dtype:
    """'auto' is bfloat16 when `device` (a device or a device_map: 'cuda:0', 'auto', a dict) puts the model on a
    GPU, else float32; names like 'bf16', 'float16', 'fp32' are accepted. A quantised backbone (`quantize` 8bit or
    4bit) keeps its unquantised parts in bf16 (fp16 on a GPU without bf16), on a CPU too; fp32 is refused."""
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    check_quantize(quantize)
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        on_gpu = device is not None and str(device) != "cpu" and torch.cuda.is_available()
        if not on_gpu:
            return torch.float32 if quantize == "none" else torch.bfloat16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif dtype not in names:
        raise UserValueError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(names)}")
    else:
        resolved = names[dtype]
    if quantize != "none" and resolved == torch.float32:
        raise UserValueError(
            f"--quantize {quantize} with --dtype fp32: a quantised backbone keeps its vision tower, "
            "embeddings and norms in bf16 or fp16 (and computes in it); use --dtype auto, bf16 or "
            "fp16"
        )
    return resolved


# --quantize: the frozen language model's linear layers in 8-bit (LLM.int8) or 4-bit NF4 (QLoRA) through
# bitsandbytes. The vision tower and projector stay unquantised: they are a small part of the weights (0.3B of 8B;
# 6B of 38B), quantising them costs quality, and bitsandbytes' CPU 4-bit path fails on narrow (32-wide) layers.
QUANTIZE = ("none", "8bit", "4bit")
# How attention is computed (transformers' attn_implementation): sdpa (torch's scaled_dot_product_attention, the
# default), eager (plain matmuls and softmax, for debugging), flash_attention_2 (needs the flash-attn package and a
# GPU). They agree to rounding, not bitwise: the one used is in checkpoints and in every cache and result key.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


ATTN_HELP = (
    "how attention is computed: sdpa (default; torch's fused kernels), eager (plain matmuls and softmax, "
    "for debugging), flash_attention_2 (needs the flash-attn package). They agree to rounding, not bitwise, "
    "so the choice is recorded in checkpoints and is part of the page cache's and the results' keys"
)


def check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise UserValueError(f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserValueError(
            "flash_attention_2 needs the flash-attn package (pip install flash-attn, on a CUDA "
            "machine); sdpa, the default, needs nothing"
        )


UNQUANTISED_MODULES = ["vision_tower", "multi_modal_projector"]


def check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE:
        raise UserValueError(f"unknown quantisation {quantize!r}: use one of {', '.join(QUANTIZE)}")


def quantization_config(quantize: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for --quantize 8bit / 4bit (NF4, double quantisation, computing in `dtype`,
    the backbone's), language model only; None for none."""
    check_quantize(quantize)
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=UNQUANTISED_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTISED_MODULES)


def backbone_quantization(backbone) -> str:
    """'4bit', '8bit' or 'none': how the backbone was loaded (its config's quantization_config)."""
    config = getattr(backbone.config, "quantization_config", None)
    if config is None:
        return "none"
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, False)
    return "4bit" if get("load_in_4bit") else "8bit" if get("load_in_8bit") else "none"


# Keys an InternVLForConditionalGeneration checkpoint has that the bare InternVLModel does not use.
IGNORED_UNEXPECTED_KEYS = re.compile(r"(^|\.)lm_head\.")


def load_backbone(
    model_id: str = DEFAULT_MODEL_ID,
    dtype="auto",
    device_map=None,
    quantize: str = "none",
    attn_implementation: str = "sdpa",
):
    """Load a frozen HF-native InternVL3.5 (`InternVLModel`) in eval mode through `AutoModel.from_pretrained`,
    its language model quantised with bitsandbytes for `quantize` 8bit / 4bit (see QUANTIZE), attention computed
    by `attn_implementation` (see ATTN_IMPLEMENTATIONS).

    Fails loudly on a remote-code id, a missing folder, and on any missing, unexpected or mismatched weight key
    (a silently re-initialised weight is the costliest bug this model family has).
    """
    from transformers import AutoModel

    check_internvl_config(model_id, read_model_config(model_id))
    check_attn_implementation(attn_implementation)
    kwargs = {"dtype": resolve_dtype(dtype, device_map, quantize), "attn_implementation": attn_implementation}
    if quantize != "none":
        kwargs["quantization_config"] = quantization_config(quantize, kwargs["dtype"])
    if device_map is not None:
        kwargs["device_map"] = device_map
    backbone, info = AutoModel.from_pretrained(model_id, output_loading_info=True, **kwargs)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not IGNORED_UNEXPECTED_KEYS.search(k))
    problems = {
        "missing": sorted(info.get("missing_keys", ())),
        "unexpected": unexpected,
        "mismatched": sorted(str(k) for k in info.get("mismatched_keys", ())),
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k} keys: {v[:5]}{' ...' if len(v) > 5 else ''} ({len(v)})" for k, v in problems.items())
        raise UserRuntimeError(
            f"loading {model_id!r} would silently re-initialise or drop weights: {detail}. "
            f"Check that the checkpoint and the installed transformers match."
        )
    backbone.requires_grad_(False)
    if quantize == "4bit":
        keep_4bit_weights_unpacked(backbone)
    return backbone.eval()


def keep_lora_inputs_in_compute_dtype(backbone) -> None:
    """peft casts each adapted projection's input to the adapter's dtype (fp32 masters here): an fp32 copy of every
    input, and fp32 LoRA matmuls. Off, LoRA computes on the backbone's activations under autocast
    (ColIntern.compute_precision); a forward outside autocast then fails loudly on the dtypes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in backbone.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def keep_4bit_weights_unpacked(backbone) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights. On a CPU with avx512_bf16, a Linear4bit repacks its
    weight for a bf16 CPU kernel at its first forward whose input needs no grad (the frozen backbone is always in
    eval mode), and from then on multiplies with that kernel, which has no autograd: once a no-grad encoding (mining,
    gradient caching's first pass) packed a layer, the gradient through its frozen weight to its input is silently
    dropped. Packing also rounds absmax to bf16, so 4-bit numerics would follow the CPU kind. GPUs never pack."""
    import bitsandbytes as bnb

    for module in backbone.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


# -----------------------------------------------------------------------------
# Query and page formats. Training, mining and evaluation all go through ColInternProcessor, which reads these,
# so the formats cannot drift apart. Bump FORMAT_VERSION whenever any of them changes: checkpoints record it.
FORMAT_VERSION = 1
# What ColIntern.embedding_identity holds, and how: bump when an entry is added or changes meaning; every page cache
# and result keyed on it is then recomputed once
IDENTITY_VERSION = 1
QUERY_PREFIX = "Query: "
QUERY_AUGMENTATION_TOKENS = 10  # pad tokens appended to each query, kept in the mask ("reasoning buffers", ColPali)
PAGE_PROMPT = "{image}\nDescribe the page."


def query_format() -> dict:
    return {
        "version": FORMAT_VERSION,
        "query_prefix": QUERY_PREFIX,
        "query_augmentation_tokens": QUERY_AUGMENTATION_TOKENS,
        "page_prompt": PAGE_PROMPT,
    }


# -----------------------------------------------------------------------------
# Inputs


class ColInternProcessor:
    """Owns the query format, the page prompt and tiling: the one way text and pages become model inputs."""

    def __init__(self, hf_processor, max_tiles: int = 4):
        if max_tiles < 1:
            raise UserValueError(f"--max_tiles must be >= 1, got {max_tiles}")
        self.hf = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.max_tiles = max_tiles
        self.image_token_id = hf_processor.image_token_id
        self.page_prompt = PAGE_PROMPT.format(image=hf_processor.image_token)
        self.query_suffix = self.tokenizer.pad_token * QUERY_AUGMENTATION_TOKENS

    @classmethod
    def from_pretrained(cls, model_id: str, max_tiles: int = 4):
        from transformers import AutoProcessor

        read_model_config(model_id)  # same clear error for a missing folder as load_backbone
        return cls(AutoProcessor.from_pretrained(model_id), max_tiles=max_tiles)

    def query_texts(self, queries: Sequence[str]) -> list:
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise UserValueError(f"query {i} is empty or not a string ({q!r}): every query needs text")
        return [QUERY_PREFIX + q + self.query_suffix for q in queries]

    def process_queries(self, queries: Sequence[str]):
        """-> BatchFeature(input_ids, attention_mask), left padded."""
        return self.tokenizer(self.query_texts(queries), padding="longest", padding_side="left", return_tensors="pt")

    def process_pages(self, images: Sequence):
        """-> BatchFeature(input_ids, attention_mask, pixel_values uint8); each page tiled into at most max_tiles
        tiles (+ a thumbnail when tiled), 'tile tokens' per tile (256 at 448px). ColIntern normalises the pixels."""
        pages = []
        for i, im in enumerate(images):
            if isinstance(im, (str, os.PathLike)):
                im = open_image(im)
            if not isinstance(im, Image.Image):
                raise TypeError(f"page {i} is a {type(im).__name__}, not a PIL image or an image path")
            pages.append(im.convert("RGB") if im.mode != "RGB" else im)
        if not pages:
            raise UserValueError("process_pages got no pages")
        # Resized and tiled by the image processor, but not rescaled or normalised: pages leave here as uint8, 4x
        # smaller than fp32 in DataLoader shared memory and on the way to the GPU; ColIntern normalises them there.
        batch = self.hf(
            text=[self.page_prompt] * len(pages),
            images=pages,
            padding="longest",
            padding_side="left",
            crop_to_patches=True,
            min_patches=1,
            max_patches=self.max_tiles,
            do_rescale=False,
            do_normalize=False,
            return_tensors="pt",
        )
        batch["pixel_values"] = as_uint8_pixels(batch["pixel_values"])  # (tiles, 3, tile, tile) uint8
        return batch

    def pixel_normalisation(self) -> dict:
        """What process_pages leaves undone, as ColIntern's keyword arguments: image_mean, image_std (per channel,
        on the 0..1 scale) and rescale_factor (1/255)."""
        ip = self.hf.image_processor
        if not (ip.do_rescale and ip.do_normalize):
            raise UserValueError(
                f"{type(ip).__name__} has do_rescale={ip.do_rescale}, do_normalize={ip.do_normalize}: "
                f"ColIntern expects InternVL's rescaled and normalised pixels"
            )
        return {
            "image_mean": list(ip.image_mean),
            "image_std": list(ip.image_std),
            "rescale_factor": float(ip.rescale_factor),
        }


def as_uint8_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Unnormalised pixels from the image processor -> uint8. The torchvision backend resizes uint8 tensors and
    returns uint8; any other dtype must hold whole numbers in 0..255, or the processor did something unexpected."""
    if pixels.dtype == torch.uint8:
        return pixels
    if pixels.is_floating_point() and not torch.equal(pixels, pixels.round()):
        raise UserValueError(
            f"unnormalised pixel_values are {pixels.dtype} with fractional values: the image "
            "processor "
            f"did not return resized uint8 pixels, so they cannot be sent as uint8"
        )
    if pixels.numel() and (pixels.min() < 0 or pixels.max() > 255):
        raise UserValueError(
            f"unnormalised pixel_values span {pixels.min().item()}..{pixels.max().item()}, not "
            "0..255: "
            f"the image processor rescaled or normalised them after all"
        )
    return pixels.to(torch.uint8)


# -----------------------------------------------------------------------------
# Model


@dataclasses.dataclass
class LoraSettings:
    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    # Language model only: a bare name list would also wrap the vision tower's q/k/v projections.
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


class ColIntern(nn.Module):
    """Frozen InternVL backbone (+ optional LoRA on the language model) + query and page heads.

    Forward passes return L2-normalised multi-vectors with masked tokens zeroed, and the boolean mask.
    """

    def __init__(
        self,
        backbone,
        proj_dim: int = 128,
        lora: LoraSettings | None = None,
        model_id: str | None = None,
        max_tiles: int = 4,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        rescale_factor: float = 1 / 255,
        bidirectional: bool = False,
        matryoshka_dims: Sequence[int] | None = None,
        dim: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.hidden_size = backbone.config.text_config.hidden_size
        self.proj_dim = proj_dim
        # Matryoshka heads: the vector prefixes the loss trained (each renormalised; recorded in checkpoints), and
        # the size this model encodes at, one of them: vectors are cut to `dim` and renormalised (the full size: as
        # they come)
        self.matryoshka_dims = sorted(set(matryoshka_dims or []) | {proj_dim}, reverse=True)
        if max(self.matryoshka_dims) != proj_dim or min(self.matryoshka_dims) < 1:
            raise UserValueError(f"Matryoshka dims {matryoshka_dims} must lie in 1..{proj_dim} (the heads' size)")
        self.dim = proj_dim if dim is None else dim
        if self.dim not in self.matryoshka_dims:
            raise UserValueError(
                f"--dim {dim}: this model was trained at {', '.join(map(str, self.matryoshka_dims))} "
                f"(its Matryoshka prefixes); pick one of them"
            )
        self.lora = lora
        self.model_id = model_id
        self.max_tiles = max_tiles
        self.image_token_id = backbone.config.image_token_id
        self.quantize = backbone_quantization(backbone)  # recorded in checkpoints
        self.attn_implementation = backbone.config._attn_implementation  # recorded in checkpoints and cache keys
        # the language model attends both ways over a query's or a page's own tokens (recorded in checkpoints and in
        # the embedding identity): every layer's is_causal off, for kernels that read it when they get no mask
        # (sdpa, flash attention), and a bidirectional padding mask in each forward (_hidden)
        self.bidirectional = bidirectional
        if bidirectional:
            for module in backbone.language_model.modules():
                if hasattr(module, "is_causal"):
                    module.is_causal = False
        backbone.requires_grad_(False)
        if lora is not None:
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                bias="none",
            )
            inject_adapter_in_model(config, backbone)
            for name, p in backbone.named_parameters():
                p.requires_grad_("lora_" in name)
                if "lora_" in name:
                    # peft gives an adapter its base layer's dtype; a bf16 adapter rounds away Adam updates below
                    # half an ulp (lr 5e-5 on weights ~0.03), so adapters keep fp32 weights over any backbone
                    # dtype. They compute in the backbone's dtype all the same (see compute_precision).
                    p.data = p.data.float()
            if not any(p.requires_grad for p in backbone.parameters()):
                raise UserValueError(f"LoRA target {lora.target_modules!r} matched no module of the backbone")
            if self.compute_dtype != torch.float32:
                keep_lora_inputs_in_compute_dtype(backbone)
        # Heads sit where the backbone's last hidden state comes out (the last GPU under device_map="auto").
        device = backbone.language_model.norm.weight.device
        self.query_head = nn.Linear(self.hidden_size, proj_dim, device=device)
        self.page_head = nn.Linear(self.hidden_size, proj_dim, device=device)
        # The image processor's rescale + normalisation, for the uint8 pages of process_pages (see _pixels). Folded
        # as the processor folds them, (x - mean / rf) / (std / rf) in fp32, so both give bitwise-equal pixels.
        # Plain tensors, not buffers: model.to(torch.bfloat16) would round buffers. Moved to the pixels' device on use.
        if (image_mean is None) != (image_std is None):
            raise UserValueError("pass both image_mean and image_std (processor.pixel_normalisation()), or neither")
        self.pixel_mean = self.pixel_std = None
        if image_mean is not None:
            self.pixel_mean = (torch.tensor(image_mean, dtype=torch.float32) * (1.0 / rescale_factor)).view(-1, 1, 1)
            self.pixel_std = (torch.tensor(image_std, dtype=torch.float32) * (1.0 / rescale_factor)).view(-1, 1, 1)
        self.train(False)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_MODEL_ID,
        proj_dim: int = 128,
        lora: LoraSettings | None = None,
        max_tiles: int = 4,
        dtype="auto",
        device_map=None,
        quantize: str = "none",
        attn_implementation: str = "sdpa",
        bidirectional: bool = False,
        matryoshka_dims: Sequence[int] | None = None,
        dim: int | None = None,
    ):
        """-> (model, processor) built on a fresh backbone (quantised for `quantize` 8bit/4bit), heads randomly
        initialised; `bidirectional`: the language model's attention non-causal; `matryoshka_dims`, `dim`: the
        trained vector prefixes and the one to encode at (see __init__)."""
        backbone = load_backbone(
            model_id, dtype=dtype, device_map=device_map, quantize=quantize, attn_implementation=attn_implementation
        )
        processor = ColInternProcessor.from_pretrained(model_id, max_tiles=max_tiles)
        model = cls(
            backbone,
            proj_dim=proj_dim,
            lora=lora,
            model_id=model_id,
            max_tiles=max_tiles,
            bidirectional=bidirectional,
            matryoshka_dims=matryoshka_dims,
            dim=dim,
            **processor.pixel_normalisation(),
        )
        return model, processor

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        model_id: str | None = None,
        dtype="auto",
        device_map=None,
        max_tiles: int | None = None,
        quantize: str | None = None,
        say=print,
        attn_implementation: str = "sdpa",
        dim: int | None = None,
    ):
        """-> (model, processor, ckpt): the backbone of the checkpoint (or model_id), quantised as the checkpoint's
        was (or as `quantize` says: `say` tells of the change), heads + LoRA loaded. Attention is
        `attn_implementation`, whichever the checkpoint was trained with (its meta records that); causal or
        bidirectional attention always as it was trained (never scored the other way). `dim`: encode at this
        Matryoshka prefix (one the checkpoint trained; default the full size)."""
        ckpt = load_checkpoint(path)
        meta = ckpt["meta"]
        model_id = model_id or meta["model_id"]
        lora = LoraSettings(**meta["lora"]) if meta["lora"] else None
        max_tiles = max_tiles or meta["max_tiles"]
        quantize = quantize or checkpoint_quantization(meta)
        say_if_quantization_differs(meta, quantize, f"checkpoint {path}", say)
        model, processor = cls.from_pretrained(
            model_id,
            proj_dim=meta["proj_dim"],
            lora=lora,
            max_tiles=max_tiles,
            dtype=dtype,
            device_map=device_map,
            quantize=quantize,
            attn_implementation=attn_implementation,
            bidirectional=meta.get("bidirectional", False),
            matryoshka_dims=meta.get("matryoshka_dims"),
            dim=dim,
        )
        load_trainable_state(model, ckpt, source=f"checkpoint {path}")
        return model, processor, ckpt

    def load_trainable_state(self, ckpt: dict, source: str = "checkpoint") -> None:
        """Heads + LoRA from a checkpoint dict: load_trainable_state in the Checkpoints section."""
        load_trainable_state(self, ckpt, source)

    def train(self, mode: bool = True):
        # The frozen backbone always runs in eval mode; only LoRA's own dropout follows the training flag.
        super().train(mode)
        self.backbone.eval()
        for name, module in self.backbone.named_modules():
            if "lora_dropout" in name:
                module.train(mode)
            # transformers checkpoints a layer only while that layer is in training mode; flip the layer's own flag
            # (its children, dropout included, stay in eval) or gradient checkpointing silently does nothing.
            if getattr(module, "gradient_checkpointing", False):
                module.training = mode
        return self

    def enable_gradient_checkpointing(self):
        """Checkpoint the language model's layers only: LoRA lives there, and nothing is back-propagated through
        the frozen vision tower and projector. The backbone-wide transformers call would also hook every sub-model's
        input embeddings to require grad, the vision tower's patch embeddings included, so autograd would record
        (and checkpointing recompute) the whole tower for nothing. Non-reentrant checkpointing needs no input
        that requires grad, so the language model's own such hook is removed too."""
        lm = self.backbone.language_model
        # transformers 5.23 renamed gradient_checkpointing_enable (a deprecated alias since) to
        # activation_checkpointing_enable; the versions before have only the old name, with the same first argument.
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        lm.disable_input_require_grads()
        self.train(self.training)

    @property
    def device(self) -> torch.device:
        return self.query_head.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the backbone computes in, and so LoRA and the heads (bf16 over a quantised one)."""
        return self.backbone.dtype

    def embedding_identity(self, pool_factor: int = 1) -> dict:
        """Everything this model's query and page vectors depend on: the backbone's content (a folder's files, a hub
        id's snapshot), the trained heads and LoRA (their values), the query/page format and tiles, the backbone's
        dtype and the dtype LoRA and the heads compute in, quantisation, attention (kernels; causal or both ways),
        and page pooling. Every cache and
        result key is built on it (mining's page cache; eval's results, through score_identity). Every entry is
        always present: adding one recomputes the caches once, and no key depends on what happened to be set."""
        return {
            "identity_version": IDENTITY_VERSION,
            "backbone": backbone_fingerprint(self.model_id),
            "adapters": self.adapter_fingerprint(),
            "proj_dim": self.proj_dim,
            "format_version": FORMAT_VERSION,
            "max_tiles": self.max_tiles,
            "dtype": dtype_name(self.backbone.dtype),
            "compute_dtype": dtype_name(self.compute_dtype),
            "quantize": self.quantize,
            "attn_implementation": self.attn_implementation,
            "bidirectional": self.bidirectional,
            "dim": self.dim,
            "pool_factor": pool_factor,
        }

    def adapter_fingerprint(self) -> str:
        """sha256 of the heads' and LoRA's values (names, dtypes, shapes, bytes): what training changed. The same
        weights from a .pt checkpoint or an exported folder give the same fingerprint."""
        h = hashlib.sha256()
        for name, p in sorted(self.named_parameters()):
            if "lora_" in name or name.startswith(("query_head.", "page_head.")):
                t = p.detach().to("cpu", torch.float32).contiguous()
                h.update(f"{name}:{tuple(t.shape)}\n".encode() + t.numpy().tobytes())
        return h.hexdigest()

    def compute_precision(self):
        """The context every forward runs in: over a bf16/fp16 backbone, autocast, so that LoRA's and the heads'
        matmuls run in that dtype (casting their fp32 master weights for each matmul, gradients reaching the fp32
        masters) instead of copying every adapted projection's input to fp32 (peft's own casting, turned off in
        keep_lora_inputs_in_compute_dtype). Over an fp32 backbone it does nothing."""
        dtype = self.compute_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))

    def trainable_parameters(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def vision_frozen(self) -> bool:
        """True unless an adapter reaches into the vision tower or projector (ColIntern's own LoRA never does: its
        targets are the language model's). Only then may image features be computed without a graph and reused."""
        return not any(
            p.requires_grad
            for m in (self.backbone.vision_tower, self.backbone.multi_modal_projector)
            for p in m.parameters()
        )

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, H, W) from process_pages -> the vision tower + projector's output (N, image_seq_length,
        hidden) in the backbone's dtype on the tower's device: the input embeddings of a page's image tokens. No
        graph over a frozen tower. Gradient caching computes them once a step and feeds them to both of its passes
        (forward_pages' image_features), so the tower runs once per page per step, not twice."""
        device = next(self.backbone.vision_tower.parameters()).device
        pixels = self._pixels(pixel_values.to(device, non_blocking=True)).to(self.backbone.dtype)
        with torch.no_grad() if self.vision_frozen else contextlib.nullcontext(), self.compute_precision():
            return self.backbone.get_image_features(pixel_values=pixels, return_dict=True).pooler_output

    def _hidden(self, batch, image_features: torch.Tensor | None = None) -> torch.Tensor:
        inputs_device = self.backbone.get_input_embeddings().weight.device
        pixels = batch.get("pixel_values")
        batch = {
            k: v.to(inputs_device, non_blocking=True)
            for k, v in batch.items()  # from pinned memory
            if k != "pixel_values"
        }
        if image_features is None and pixels is not None:
            image_features = self.image_features(pixels)
        if image_features is not None:
            # what InternVLModel.forward does with pixel_values, with the features given: both transformers 5.17
            # (which has no mm_encoder_outputs argument) and later take the embeddings, bitwise as from pixels
            ids = batch.pop("input_ids")
            slots = ids == self.image_token_id
            if int(slots.sum()) != image_features.shape[0] * image_features.shape[1]:
                raise ValueError(
                    f"{int(slots.sum())} image tokens in the batch but image features for "
                    f"{image_features.shape[0] * image_features.shape[1]}: features of another batch?"
                )
            embeds = self.backbone.get_input_embeddings()(ids)
            batch["inputs_embeds"] = embeds.masked_scatter(
                slots.unsqueeze(-1), image_features.to(embeds.device, embeds.dtype)
            )
        if self.bidirectional:
            batch["attention_mask"] = self._bidirectional_mask(batch["attention_mask"])
        # use_cache=False: the text config's use_cache is true, and transformers would otherwise build a KV cache
        # (a copy of every layer's keys and values) in every forward that is not checkpointed training.
        return self.backbone(**batch, use_cache=False).last_hidden_state  # (B, L, H)

    def _bidirectional_mask(self, mask: torch.Tensor):
        """(B, L) padding mask -> what the language model's attention takes for every token attending every
        non-pad token: transformers' own bidirectional mask in its attention implementation's form (a 4D mask,
        passed through as it is; flash attention keeps the 2D one)."""
        from transformers.masking_utils import create_bidirectional_mask

        config = self.backbone.config.text_config
        shape = torch.empty(mask.shape[0], mask.shape[1], 1, dtype=self.backbone.dtype, device=mask.device)
        made = create_bidirectional_mask(config, shape, mask, allow_is_bidirectional_skip=False)
        return made if isinstance(made, torch.Tensor) and made.dim() == 4 else mask

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 tiles (N, 3, H, W) from process_pages -> normalised fp32 tiles on the same device. Float pixels
        are taken as already normalised (a stock InternVL processor's) and returned unchanged."""
        if pixels.is_floating_point():
            return pixels
        if pixels.dtype != torch.uint8:
            raise TypeError(
                f"pixel_values must be uint8 (ColInternProcessor.process_pages) or normalised floats, "
                f"got {pixels.dtype}"
            )
        if self.pixel_mean is None:
            raise UserValueError(
                "uint8 pixel_values need the processor's normalisation: build ColIntern with "
                "**processor.pixel_normalisation() (ColIntern.from_pretrained does)"
            )
        if self.pixel_mean.device != pixels.device:
            self.pixel_mean, self.pixel_std = self.pixel_mean.to(pixels.device), self.pixel_std.to(pixels.device)
        return pixels.float().sub_(self.pixel_mean).div_(self.pixel_std)  # (N, 3, H, W) fp32

    def _project(self, head: nn.Linear, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # the head multiplies in the compute dtype (under compute_precision); normalised, masked and scored in fp32
        emb = head(hidden.to(head.weight.device)).float()
        if self.dim != self.proj_dim:  # a Matryoshka prefix
            emb = emb[..., : self.dim]
        emb = F.normalize(emb, dim=-1)  # (B, L, dim)
        return emb * mask.unsqueeze(-1).to(emb.dtype)

    def forward_queries(self, batch):
        """batch from ColInternProcessor.process_queries -> (emb (B, Lq, D), mask (B, Lq) bool)."""
        mask = batch["attention_mask"].to(self.device).bool()
        with self.compute_precision():
            return self._project(self.query_head, self._hidden(batch), mask), mask

    def forward_pages(self, batch, image_features: torch.Tensor | None = None):
        """batch from ColInternProcessor.process_pages -> (emb (B, Lp, D), mask (B, Lp) bool).
        The mask keeps the page's image tokens (not the prompt's text tokens). `image_features` (image_features() of
        the batch's pixel_values) stand in for the pixels: the vision tower does not run again."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool() & (ids == self.image_token_id)
        with self.compute_precision():
            return self._project(self.page_head, self._hidden(batch, image_features), mask), mask

    @torch.inference_mode()
    def encode_queries(
        self, processor: ColInternProcessor, queries: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> list:
        """-> one (Lq_i, D) float32 tensor per query on the CPU, pad tokens removed."""
        return self._encode(processor.process_queries, self.forward_queries, queries, batch_size, progress, "queries")

    @torch.inference_mode()
    def encode_pages(
        self, processor: ColInternProcessor, pages: Sequence, batch_size: int = 4, progress: bool = False
    ) -> list:
        """-> one (Lp_i, D) float32 tensor per page (PIL image or path) on the CPU, masked tokens removed."""
        return self._encode(processor.process_pages, self.forward_pages, pages, batch_size, progress, "pages")

    def _encode(self, process, forward, items, batch_size, progress, what):
        """Batch by batch, one behind: batch k+1 is processed (tokenised, tiled: CPU work) and sent from pinned
        memory while the GPU still runs batch k's forward, and batch k's embeddings are fetched only then. The same
        forwards on the same batches as one at a time, so the same embeddings."""
        out, running = [], None
        for start in progress_bar(
            range(0, len(items), batch_size), desc=f"encode {what}", disable=not progress, unit="batch"
        ):
            batch = pin_batch(process(items[start : start + batch_size]), self.device)
            launched = forward(batch)
            if running is not None:
                out.extend(unpad(running[0].float(), running[1]))
            running = launched
        if running is not None:
            out.extend(unpad(running[0].float(), running[1]))
        return out


def pin_batch(batch, device):
    """A processor's batch bound for `device`, its tensors in pinned memory when that is a GPU (so the copy there is
    asynchronous: the caller goes on with the next batch's CPU work); as it is for a CPU. Callers' own DataLoaders
    pin with pin_memory=True; this is for batches made in the calling thread (eval's, under mteb's loader)."""
    if torch.device(device).type != "cuda":
        return batch
    return type(batch)({k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})


def unpad(emb: torch.Tensor, mask: torch.Tensor) -> list:
    """(B, L, D) + (B, L) mask -> list of (L_i, D) on the CPU, in sequence order. The batch crosses to the CPU in
    one copy (one GPU sync), not one per sequence."""
    emb, mask = emb.cpu(), mask.cpu()
    return [e[m] for e, m in zip(emb, mask)]


# -----------------------------------------------------------------------------
# Scoring: exact MaxSim

# Similarity values per block of the training maxsim, forward and backward alike. A block's transients are its
# similarity block and, in the backward, (queries, pages, Lq, D) gathers of at most the same size, so memory no longer
# grows with Nq x Np x Lq x Lp. GPU: 32M values (128 MiB in fp32) against the 6.3 GB of one dense similarity tensor
# at real shapes (32 queries x 50 tokens x 768 gathered 1,280-token pages: 2M values a page, so 16 pages a block and
# 48 blocks), big enough that each block's matmul outweighs its dozen kernel launches. CPU: 1M values, the top of the
# cache-sized range where maxsim_tokens' blocks run near the matmul peak; the per-block Python is negligible there.
CPU_TRAIN_SIM_BLOCK = 1 << 20
GPU_TRAIN_SIM_BLOCK = 1 << 25


def _index_dtype(length: int) -> torch.dtype:
    """The smallest integer dtype that holds token indices 0..length-1."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if length - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _sim_blocks(nq: int, np_: int, per_pair: int, budget: int):
    """Yield (query slice, page slice) tiles of the (Nq, Np) grid, each of at most `budget` elements when a
    (query, page) pair costs `per_pair`: whole pages, and every query unless one page does not fit."""
    pages = max(1, min(np_, budget // max(1, nq * per_pair)))
    rows = max(1, min(nq, budget // max(1, pages * per_pair)))
    for p0 in range(0, np_, pages):
        for q0 in range(0, nq, rows):
            yield slice(q0, min(nq, q0 + rows)), slice(p0, min(np_, p0 + pages))


class _MaxSim(torch.autograd.Function):
    """maxsim, blockwise: saves the inputs, the masks and each query token's best page token, never similarities.

    Ties: a tied max sends all of its gradient to the one token torch.max picks (a subgradient; amax would split it
    evenly). Embeddings from continuous weights do not tie."""

    @staticmethod
    def forward(ctx, queries, pages, query_mask, page_mask):
        nq, lq, d = queries.shape
        np_, lp, _ = pages.shape
        budget = GPU_TRAIN_SIM_BLOCK if queries.is_cuda else CPU_TRAIN_SIM_BLOCK
        blocks = list(_sim_blocks(nq, np_, lq * max(lp, d), budget))  # max(Lp, D): the backward's gathers too
        best = queries.new_empty((nq, np_, lq))
        picked = torch.empty((nq, np_, lq), dtype=_index_dtype(lp), device=queries.device)
        for qs, ps in blocks:
            sim = torch.einsum("qid,pjd->qpij", queries[qs], pages[ps])  # (nq, n, Lq, Lp)
            if page_mask is not None:
                sim.masked_fill_(~page_mask[None, ps, None, :], float("-inf"))
            best[qs, ps], picked[qs, ps] = sim.max(dim=-1)
        if query_mask is not None:
            best.masked_fill_(~query_mask[:, None, :], 0.0)
        ctx.blocks = blocks
        ctx.save_for_backward(queries, pages, query_mask, page_mask, picked)
        return best.sum(dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores):
        queries, pages, query_mask, page_mask, picked = ctx.saved_tensors
        need_queries, need_pages = ctx.needs_input_grad[:2]
        nq, lq, d = queries.shape
        np_, lp, _ = pages.shape
        # d score[q, p] / d best[q, p, i]: none for a padded query token, none from a page without a real token
        # (its score is -inf whatever the inputs)
        weight = grad_scores.to(queries.dtype)[:, :, None].expand(nq, np_, lq)  # (Nq, Np, Lq)
        if query_mask is not None:
            weight = weight * query_mask[:, None, :]
        if page_mask is not None:
            weight = weight * page_mask.any(dim=1)[None, :, None]
        flat_pages = pages.reshape(np_ * lp, d)
        grad_queries = queries.new_zeros(queries.shape) if need_queries else None
        grad_pages = pages.new_zeros(pages.shape) if need_pages else None
        for qs, ps in ctx.blocks:
            w = weight[qs, ps]  # (nq, n, Lq)
            if need_queries:  # d score / d query token: the page token it picked
                offsets = torch.arange(ps.start, ps.stop, device=pages.device)[None, :, None] * lp
                rows = (picked[qs, ps].long() + offsets).flatten()  # each query token's best token, in flat_pages
                best_tokens = flat_pages.index_select(0, rows).view(*w.shape, d)  # (nq, n, Lq, D)
                grad_queries[qs] += torch.einsum("qpi,qpid->qid", w, best_tokens)
            if need_pages:  # d score / d page token: the sum of the query tokens that picked it, as a matmul over
                # the weighted one-hot choices (a block of the forward's size): many query tokens pick one page
                # token, and index_add_ would add them with float atomics on CUDA, in an order that varies by run
                chose = w.new_zeros((*w.shape, lp)).scatter_(-1, picked[qs, ps].long()[..., None], w[..., None])
                grad_pages[ps] += torch.einsum("qpij,qid->pjd", chose, queries[qs])
        return grad_queries, grad_pages, None, None


def maxsim(
    queries: torch.Tensor,
    pages: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    page_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable exact MaxSim of padded batches, for training.

    queries (Nq, Lq, D), pages (Np, Lp, D), masks True on real tokens -> scores (Nq, Np) in the inputs' dtype:
    for each query token its best real page token, summed over real query tokens. A padded page token never wins
    a max (it is -inf, not 0), a padded query token adds nothing. Memory: the similarities exist one block at a time
    (CPU/GPU_TRAIN_SIM_BLOCK values); backward keeps only the inputs and (Nq, Np, Lq) small-int argmax indices.
    """
    return _MaxSim.apply(queries, pages, query_mask, page_mask)


def pad_queries(queries: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero-pad ragged queries to (Nq, Lq, D). Exact: a zero query vector's best similarity is 0."""
    return torch.nn.utils.rnn.pad_sequence(list(queries), batch_first=True)


def pad_pages(
    pages: Sequence[torch.Tensor], dtype: torch.dtype | None = None, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Pad ragged pages to (Np, Lp, D) by repeating each page's own first token: a copy never changes the max,
    so the padded batch scores exactly, with no mask pass (zero-padding would win a max over negative scores).
    `dtype`: the padded batch's (default the pages'); the copy converts, no extra pass. `buffer`: a flat tensor of
    that dtype, at least Np x Lp x D long, to pad into (the result is a view of it) instead of a new tensor."""
    length = max(p.shape[0] for p in pages)
    shape = (len(pages), length, pages[0].shape[1])
    if buffer is None:
        out = pages[0].new_empty(shape, dtype=dtype)
    else:
        out = buffer[: math.prod(shape)].view(shape)
    for i, p in enumerate(pages):
        if p.shape[0] == 0:
            raise UserValueError(f"page {i} has no tokens to score")
        out[i, : p.shape[0]] = p
        out[i, p.shape[0] :] = p[0]
    return out


# Similarity values per block in maxsim_tokens. On a CPU a block must stay in cache: blocks of 256K-1M fp32 values
# run near the matmul peak, 32M-value blocks that spill to memory at a third of it. A bf16 block (native bf16 only:
# the matmul writes bf16) takes half the bytes, so the same cache holds twice the values. A GPU wants big blocks.
CPU_SIM_BLOCK = 1 << 18
CPU_SIM_BLOCK_BF16 = 1 << 19
GPU_SIM_BLOCK = 1 << 28
PAGE_CHUNK_TOKENS = 1 << 15  # page tokens padded together (sorted by length, so little padding)
QUERY_BLOCK_TOKENS = 1 << 15  # query tokens scored together by maxsim_topk (bounds its (tokens, pages) buffer)
SCORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware, probed once per process. oneDNN must take bf16 matmuls
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) and, on x86, the CPU must have AVX512-BF16 or AMX: oneDNN also says
    yes on plain AVX512 CPUs, where it emulates bf16 in software and fp32 is as fast or faster. Elsewhere (ARM's
    BF16 extension) oneDNN's answer is the hardware's. No timing: the answer must not change from run to run, since
    it is part of mining's page-cache key."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "x86", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


# Bump when exact MaxSim's arithmetic changes (summation order, blocking, rounding): results keyed on score_identity
# are then recomputed once
SCORING_VERSION = 1


def score_identity(embedding: dict, scoring: torch.dtype, device, rerank: int = 0) -> dict:
    """What a score depends on: the embeddings' identity (ColIntern.embedding_identity), the dtype MaxSim rounds to
    and the one it multiplies in on `device` (matmul_dtype: bf16 on a CPU without native bf16 is multiplied in fp32),
    the scoring code's version, the rerank depth and the vectors' dimension. Every entry is always present."""
    return {
        "embedding": embedding,
        "score_dtype": dtype_name(scoring),
        "matmul_dtype": dtype_name(matmul_dtype(scoring, device)),
        "scoring_version": SCORING_VERSION,
        "rerank": rerank,
        "dim": embedding["dim"],
    }


def score_dtype(requested="auto", device="cpu") -> torch.dtype:
    """The dtype MaxSim scores in: embeddings are rounded to it block by block, and each block is multiplied in it
    where the hardware has it (see matmul_dtype); per-query sums are float32 either way.

    `requested`: a torch dtype or a name (fp32, bf16, fp16, ...) is taken as given; 'auto' (or None) is bf16 on a CPU
    with native bf16 (cpu_has_native_bf16) and on a GPU (fp16 on one without bf16), and fp32 on any other CPU, where
    bf16 would be no faster: the blocks would be upcast to fp32 anyway."""
    if requested not in (None, "auto"):
        return resolve_dtype(requested)
    if torch.device(device).type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return resolve_dtype("auto", device)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16': how flags, logs and stats name a score dtype."""
    return {v: k for k, v in SCORE_DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def matmul_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The dtype scores are computed in for embeddings rounded to `dtype`: `dtype` itself, except bf16/fp16 on a
    CPU without native support (bf16: see cpu_has_native_bf16; torch's fallback matmul runs ~100x below fp32), where
    each block is upcast to fp32: the same rounded inputs, fp32 arithmetic, at the fp32 speed."""
    if torch.device(device).type != "cpu" or dtype == torch.float32:
        return dtype
    if dtype == torch.bfloat16:
        return dtype if cpu_has_native_bf16() else torch.float32
    if dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return dtype
    return torch.float32


def cpu_sim_block(compute: torch.dtype) -> int:
    """maxsim_tokens' default block on a CPU for blocks computed in `compute`."""
    return CPU_SIM_BLOCK if compute == torch.float32 else CPU_SIM_BLOCK_BF16


@contextlib.contextmanager
def scoring_threads(device):
    """Around a scoring loop on a CPU: yields the torch thread count (workers for maxsim_tokens) and runs the
    caller's own small ops (padding, sums, top-k merges) single-threaded meanwhile; split over threads, such ops
    wait on each other at every call, which on a shared machine cost more than the scoring. Elsewhere yields None."""
    if torch.device(device).type != "cpu":
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


_CPU_POOL = None  # maxsim_tokens' worker threads on a CPU, one per torch thread


def _cpu_pool(workers: int):
    global _CPU_POOL
    if _CPU_POOL is None or _CPU_POOL._max_workers != workers:
        from concurrent.futures import ThreadPoolExecutor

        if _CPU_POOL is not None:
            _CPU_POOL.shutdown(wait=False)
        _CPU_POOL = ThreadPoolExecutor(workers, thread_name_prefix="maxsim")
    return _CPU_POOL


@torch.no_grad()
def maxsim_tokens(
    query_tokens: torch.Tensor, pages: torch.Tensor, block_elements: int | None = None, workers: int | None = None
) -> torch.Tensor:
    """(T, D) query tokens x (Np, Lp, D) pages from pad_pages, both in the dtype to multiply in -> (T, Np) in that
    dtype: each query token's best similarity on each page. Tiled so that one similarity block holds at most
    `block_elements` values (default: cpu_sim_block on a CPU, GPU_SIM_BLOCK on a GPU).

    On a CPU, `workers` single-threaded worker threads (default: torch's thread count) each take the next block
    not yet taken until none is left, instead of splitting every small matmul across all threads: no barrier per
    block, so a core taken by another process slows only its own worker (on a busy 2-core machine: 7 GFLOP/s with
    split matmuls, 30-100 this way). Each worker multiplies into one buffer of its own, reused for every block: a
    fresh block-sized tensor per block is fresh memory from the allocator, thousands of page faults per scoring run
    (bench_maxsim at its defaults: 1.25x the scores, 1.17x the top-k, with the buffers and the shared counter; the
    README's bench section has each step)."""
    t, d = query_tokens.shape
    np_, lp, _ = pages.shape
    budget = block_elements or (GPU_SIM_BLOCK if query_tokens.is_cuda else cpu_sim_block(query_tokens.dtype))
    # roughly square blocks of (query tokens) x (whole pages); everything at once when it fits
    group = np_ if t * np_ * lp <= budget else max(1, min(np_, math.isqrt(budget) // lp))
    rows = max(1, min(t, budget // (group * lp)))
    rows = -(-t // -(-t // rows)) if t else rows  # as many blocks of rows, of even size: no thin last block
    flat = pages.reshape(np_ * lp, d)
    best = query_tokens.new_empty((t, np_))
    blocks = [(p0, r0) for p0 in range(0, np_, group) for r0 in range(0, t, rows)]  # disjoint parts of `best`
    threads = torch.get_num_threads()
    workers = min(len(blocks), workers or threads) if query_tokens.device.type == "cpu" else 1
    taken, lock = iter(range(len(blocks))), threading.Lock()
    inference = torch.is_inference_mode_enabled()  # worker threads start in the default grad modes

    def work(pooled: bool):
        with torch.inference_mode(inference), torch.no_grad():
            if pooled:
                torch.set_num_threads(1)  # this worker thread's own BLAS threads; the caller's are restored below
            buffer = query_tokens.new_empty(rows * group * lp)
            while True:
                with lock:
                    i = next(taken, None)
                if i is None:
                    return
                p0, r0 = blocks[i]
                p1, r1 = min(np_, p0 + group), min(t, r0 + rows)
                sim = buffer[: (r1 - r0) * (p1 - p0) * lp].view(r1 - r0, (p1 - p0) * lp)
                torch.mm(query_tokens[r0:r1], flat[p0 * lp : p1 * lp].T, out=sim)
                best[r0:r1, p0:p1] = sim.view(r1 - r0, p1 - p0, lp).amax(dim=-1)

    if workers <= 1:
        work(pooled=False)
        return best
    try:
        list(_cpu_pool(workers).map(work, [True] * workers))
    finally:
        torch.set_num_threads(threads)
    return best


def _rounded(x: torch.Tensor, dtype: torch.dtype, compute: torch.dtype, device) -> torch.Tensor:
    """`x` on `device`, its values rounded to `dtype`, ready to be copied into a `compute` buffer. The rounding is
    a pass of its own only when the compute dtype differs (bf16 scored in fp32): otherwise the copy into the
    buffer rounds."""
    x = x.to(device)
    return x.to(dtype) if dtype != compute and x.dtype != dtype else x


def pack_queries(queries: Sequence[torch.Tensor], dtype, device, compute: torch.dtype | None = None) -> tuple:
    """Ragged queries -> (tokens (T, D) rounded to `dtype`, in `compute` (default `dtype`), owner (T,) query index
    of each token): no padding, so no wasted FLOPs."""
    compute = compute or dtype
    tokens = torch.cat([_rounded(q, dtype, compute, device).to(compute) for q in queries])
    lengths = torch.tensor([q.shape[0] for q in queries], device=device)
    return tokens, torch.repeat_interleave(torch.arange(len(queries), device=device), lengths)


def page_chunks(pages: Sequence[torch.Tensor], dtype, device, compute: torch.dtype | None = None, reuse: bool = False):
    """Yield (page indices, padded pages (n, Lp, D) rounded to `dtype`, in `compute` (default `dtype`)), pages
    sorted by length so padding stays small. Each page is converted as it is padded, one chunk at a time.

    `reuse`: pad every chunk into one buffer, overwritten by the next chunk, for a caller done with each chunk
    before it takes the next. A fresh tensor per chunk is memory touched for the first time, whose page faults
    cost as much again as the copy (on a 2-core CPU: 10% of a scoring run, against 2% with the buffer)."""
    compute = compute or dtype
    order = sorted(range(len(pages)), key=lambda i: pages[i].shape[0])
    buffer = None
    start = 0
    while start < len(order):
        end = start + 1  # lengths ascend, so a chunk's padded size is (pages in it) x (its last page's length)
        while end < len(order) and (end + 1 - start) * pages[order[end]].shape[0] <= PAGE_CHUNK_TOKENS:
            end += 1
        idx = order[start:end]
        size = (end - start) * pages[order[end - 1]].shape[0] * pages[order[0]].shape[1]
        if reuse and (buffer is None or buffer.numel() < size):
            buffer = torch.empty(max(size, PAGE_CHUNK_TOKENS * pages[order[0]].shape[1]), dtype=compute, device=device)
        yield (
            torch.tensor(idx, device=device),
            pad_pages([_rounded(pages[i], dtype, compute, device) for i in idx], dtype=compute, buffer=buffer),
        )
        start = end


def sum_by_query(best: torch.Tensor, owner: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(T, n) per-token best similarities -> (n_queries, n) float32 MaxSim scores, each query's tokens summed in one
    fixed order on every device. On CUDA, index_add_ adds repeated indices with float atomics, in an order that
    varies from run to run (and so could flip near-ties in a top-k): there each query's tokens (a contiguous run of
    `owner`, as pack_queries lays them) go into a zero-padded dense (n_queries, longest, n) block, summed along its
    token axis. On a CPU index_add_ adds row after row, in index order, and is kept: the dense block is ~15x slower
    there (a fresh block is page faults)."""
    if not adds_in_varying_order(best.device) or owner.numel() == 0:
        return best.new_zeros((n_queries, best.shape[1]), dtype=torch.float32).index_add_(0, owner, best.float())
    counts = torch.bincount(owner, minlength=n_queries)
    starts = torch.cumsum(counts, 0) - counts  # integers: exact
    slot = torch.arange(owner.numel(), device=owner.device) - starts[owner]
    dense = best.new_zeros((n_queries, int(counts.max()), best.shape[1]), dtype=torch.float32)
    dense[owner, slot] = best.float()
    return dense.sum(dim=1)


def adds_in_varying_order(device) -> bool:
    """Whether index_add_ on this device adds repeated indices in an order that varies by run (CUDA's atomics)."""
    return torch.device(device).type == "cuda"


def merge_topk(
    values: torch.Tensor, indices: torch.Tensor, new_values: torch.Tensor, new_indices: torch.Tensor, k: int
) -> tuple:
    """A running top-k per row, (n, k) values and indices, merged with (n, m) new ones -> the k best of both."""
    return top_k_by_index(torch.cat([values, new_values], dim=1), torch.cat([indices, new_indices], dim=1), k)


def top_k_by_index(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple:
    """(n, m) values and their page indices -> the k best per row, (n, k) each, best first; equal values in page
    index order (torch.topk leaves the order of ties unspecified), so the pick never depends on how pages or queries
    were grouped."""
    by_index = indices.argsort(dim=1, stable=True)
    v = values.gather(1, by_index)
    order = v.argsort(dim=1, descending=True, stable=True)[:, :k]
    return v.gather(1, order), indices.gather(1, by_index).gather(1, order)


def sync(device) -> None:
    """Wait for queued GPU work (before reading a clock); nothing on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# How far a bf16 score can be from the exact (float64) one, per query token, for unit vectors of dimension D
# (see bf16_score_bound): bf16 keeps 8 significand bits, so rounding to it has unit roundoff u = 2^-8. Each input
# carries a relative error <= u per element, so a rounded product q_i p_i is off by <= (2u + u^2)|q_i p_i| and the
# dot product by <= ~2u sum|q_i p_i| <= 2u |q| |p| = 2u (Cauchy-Schwarz, unit vectors). fp32 accumulation of D terms
# adds <= D 2^-24 sum|q_i p_i| <= D 2^-24; a native bf16 matmul writes bf16, one more rounding: <= u |s| <= u. A max
# over page tokens is 1-Lipschitz, so a token's best similarity is off by at most the worst similarity error; the
# float32 sum over Lq query tokens adds the Lq errors (and <= Lq^2 2^-24 of its own).
BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24


def score_error_bound(dtype: torch.dtype, query_tokens: int, dim: int) -> float:
    """Worst-case |score - exact score| of one query of `query_tokens` unit vectors of size `dim` scored in
    `dtype` (fp32 inputs taken as exact; the derivation is above)."""
    rounding = 3 * BF16_UNIT_ROUNDOFF if dtype == torch.bfloat16 else 0.0
    if dtype not in (torch.bfloat16, torch.float32):
        raise UserValueError(f"no bound derived for {dtype}")
    return query_tokens * (rounding + (dim + query_tokens) * FP32_UNIT_ROUNDOFF)


def maxsim_scores(
    queries: Sequence[torch.Tensor],
    pages: Sequence[torch.Tensor],
    device="cpu",
    dtype=torch.float32,
    max_sim_elements: int | None = None,
) -> torch.Tensor:
    """Exact MaxSim of ragged queries x ragged pages -> (Nq, Np) float32 on the CPU.

    Query tokens are packed (no padding), pages sorted by length and padded in chunks with their own first token,
    and each chunk scored in similarity blocks of at most `max_sim_elements` values (default: cache-sized on a CPU,
    large on a GPU). `dtype` is the score dtype (see score_dtype; 'auto' resolves there): what embeddings are
    rounded to before scoring; scores are summed in float32."""
    if len(queries) == 0 or len(pages) == 0:
        return torch.zeros(len(queries), len(pages))
    dtype = score_dtype(dtype, device)
    compute = matmul_dtype(dtype, device)
    scores = torch.empty(len(queries), len(pages))
    with scoring_threads(device) as workers:
        tokens, owner = pack_queries(queries, dtype, device, compute)  # (T, D), (T,)
        for idx, chunk in page_chunks(pages, dtype, device, compute, reuse=True):
            best = maxsim_tokens(tokens, chunk, max_sim_elements, workers)
            scores[:, idx.cpu()] = sum_by_query(best, owner, len(queries)).cpu()
    return scores


def maxsim_topk(
    queries: Sequence[torch.Tensor],
    pages: Sequence[torch.Tensor],
    k: int,
    device="cpu",
    dtype=torch.float32,
    max_sim_elements: int | None = None,
    on_scores=None,
    query_block_tokens: int = QUERY_BLOCK_TOKENS,
) -> tuple:
    """The k best pages per query by exact MaxSim, never holding the (Nq, Np) matrix: each block of queries keeps
    a running top-k while page chunks stream past. `dtype`: the score dtype, as in maxsim_scores.

    -> (scores (Nq, k) float32, page indices (Nq, k) int64), best first, on the CPU; k is capped at len(pages),
    and slots no page filled are (-inf, -1). `on_scores(q0, q1, page_idx, scores)`, if given, sees every
    (queries q0:q1) x (pages page_idx) float32 block before it enters the top-k and may set entries to -inf to
    exclude them (e.g. a query's positive), or count them."""
    k = min(k, len(pages))
    values = torch.full((len(queries), k), float("-inf"))
    indices = torch.full((len(queries), k), -1, dtype=torch.long)
    if len(queries) == 0 or k == 0:
        return values, indices
    blocks = query_blocks([q.shape[0] for q in queries], query_block_tokens)
    dtype = score_dtype(dtype, device)
    compute = matmul_dtype(dtype, device)
    with scoring_threads(device) as workers:
        chunks = page_chunks(pages, dtype, device, compute, reuse=len(blocks) == 1)
        if len(blocks) > 1:
            chunks = list(chunks)  # every block of queries meets every chunk: pad them once
        for q0, q1 in blocks:
            tokens, owner = pack_queries(queries[q0:q1], dtype, device, compute)
            best_v = torch.full((q1 - q0, k), float("-inf"), device=device)
            best_i = torch.full((q1 - q0, k), -1, dtype=torch.long, device=device)
            for idx, chunk in chunks:
                best = maxsim_tokens(tokens, chunk, max_sim_elements, workers)
                scores = sum_by_query(best, owner, q1 - q0)  # (nq, n)
                if on_scores is not None:
                    on_scores(q0, q1, idx, scores)
                best_v, best_i = merge_topk(best_v, best_i, scores, idx.expand(q1 - q0, -1), k)
            values[q0:q1], indices[q0:q1] = best_v.cpu(), best_i.cpu()
    indices[values == float("-inf")] = -1
    return values, indices


# -----------------------------------------------------------------------------
# Pooling: fewer page vectors for a smaller index (eval.py and mine_hard_negatives.py --pool_factor)
#
# A page's L tokens are clustered hierarchically (Ward linkage on the unit token vectors themselves) into
# max(1, L // pool_factor) clusters, each replaced by its renormalised mean; queries are never pooled and scoring is
# the same exact MaxSim. colpali-engine's HierarchicalTokenPooler runs Ward on the rows of 1 - E E^T instead: an
# L-dimensional observation per token, O(L^3) per page for the distances, against O(L^2 D) here.


def page_clusters(page: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """(L, D) unit vectors -> (L,) int64 cluster of each token, 0..n_clusters-1 numbered by first token. The tree is
    cut after its first L - n_clusters merges (scipy sorts them by height, stably), so the count is exact even when
    heights tie, where fcluster's maxclust may return fewer; otherwise the same clusters."""
    import numpy as np
    from scipy.cluster.hierarchy import linkage

    n = len(page)
    merges = linkage(page.detach().cpu().double().numpy(), method="ward")[: n - n_clusters, :2].astype(np.int64)
    parent = np.arange(2 * n - 1)
    parent[merges[:, 0]] = parent[merges[:, 1]] = np.arange(n, n + len(merges))
    parent = parent[: n + len(merges)]
    while True:  # pointer jumping: every token to its cluster's root
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    _, first, inverse = np.unique(parent[:n], return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return torch.from_numpy(rank[inverse.reshape(-1)])


def pool_page(page: torch.Tensor, pool_factor: int) -> torch.Tensor:
    """(L, D) unit page vectors -> (max(1, L // pool_factor), D): each cluster's renormalised mean, clusters in the
    order of their first token, in the page's dtype and device. pool_factor 1 returns `page` itself."""
    if pool_factor < 1:
        raise UserValueError(f"pool_factor must be >= 1, got {pool_factor}")
    n_clusters = max(1, len(page) // pool_factor)
    if n_clusters >= len(page):
        return page
    label = page_clusters(page, n_clusters).to(page.device)
    sums = torch.zeros(n_clusters, page.shape[1], dtype=torch.float32, device=page.device)
    sums.index_add_(0, label, page.float())  # (K, D)
    return F.normalize(sums, dim=-1).to(page.dtype)


def pool_pages(pages: Sequence[torch.Tensor], pool_factor: int, workers: int | None = None) -> list:
    """pool_page over a list of pages, on `workers` threads (default: torch's thread count): the distance
    computation and the linkage run in numpy/scipy. Same result whatever the thread count."""
    if pool_factor == 1:
        return list(pages)
    workers = min(len(pages), workers or torch.get_num_threads())
    if workers <= 1:
        return [pool_page(p, pool_factor) for p in pages]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="pool") as ex:
        return list(ex.map(functools.partial(pool_page, pool_factor=pool_factor), pages))


def index_bytes(pages: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes the pages' vectors take held in `dtype` (default: their own)."""
    return sum(p.numel() * (dtype or p.dtype).itemsize for p in pages)


# -----------------------------------------------------------------------------
# Loss


def contrastive_loss(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    pages: torch.Tensor,
    page_mask: torch.Tensor,
    pos_index: torch.Tensor,
    temperature: float = 0.02,
    normalize_by_query_length: bool = True,
    dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """InfoNCE over MaxSim: query i's positive is pages[pos_index[i]]; every other page is a negative.

    `pages` is the candidate pool for all queries: the in-batch positives (from every rank, when gathered), then
    any hard negatives, all shared. Multi-GPU: gather pages from all ranks and pass pos_index = rank * B + arange(B).
    `dims` (Matryoshka): the plain sum of this loss over each vector prefix of those sizes, every prefix
    renormalised (a masked token's zero vector stays zero), so that each prefix is a retriever of its own.
    """
    if dims:
        return sum(
            contrastive_loss(
                matryoshka_prefix(queries, d),
                query_mask,
                matryoshka_prefix(pages, d),
                page_mask,
                pos_index,
                temperature,
                normalize_by_query_length,
            )
            for d in dims
        )
    scores = maxsim(queries, pages, query_mask, page_mask)  # (B, Npages)
    if normalize_by_query_length:
        scores = scores / query_mask.sum(dim=1, keepdim=True).clamp(min=1).to(scores.dtype)
    return F.cross_entropy(scores.float() / temperature, pos_index.to(scores.device))


def matryoshka_prefix(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., D) unit vectors (or zero ones) -> their first `dim` entries, renormalised (zero vectors stay zero)."""
    return emb if dim == emb.shape[-1] else F.normalize(emb[..., :dim], dim=-1)


# -----------------------------------------------------------------------------
# Checkpoints: one .pt dict, loadable with weights_only=True
#     {"kind": "colintern", "meta": {...}, "heads": {...}, "lora": {...}, "train_state": {...} (train.py only)}
# Only what training changes is saved, the heads and LoRA: the frozen backbone comes from meta["model_id"].

CHECKPOINT_KIND = "colintern"


def checkpoint_dict(
    model: ColIntern, step: int = 0, epoch: int = 0, train_state: dict | None = None, training_data: list | None = None
) -> dict:
    meta = {
        "model_id": model.model_id,
        "hidden_size": model.hidden_size,
        "proj_dim": model.proj_dim,
        "max_tiles": model.max_tiles,
        "lora": dataclasses.asdict(model.lora) if model.lora else None,
        "quantize": model.quantize,
        "attn_implementation": model.attn_implementation,
        "bidirectional": model.bidirectional,
        "matryoshka_dims": model.matryoshka_dims,
        "format": query_format(),
        "step": step,
        "epoch": epoch,
    }
    if training_data is not None:
        # lineage: every dataset these weights were trained on, warm starts included (train.py); eval.py declares it
        # to mteb. Checkpoints without it (older ones, untrained heads) still load.
        meta["training_data"] = sorted(training_data)
    ckpt = {"kind": CHECKPOINT_KIND, "meta": meta, **trainable_state_dict(model)}
    if train_state is not None:
        ckpt["train_state"] = train_state
    return ckpt


def trainable_state_dict(model: ColIntern) -> dict:
    """Heads + LoRA weights, copied to the CPU. LoRA as peft's get_peft_model_state_dict names it, without the
    adapter name: "language_model.layers.0.self_attn.q_proj.lora_A.weight"."""
    heads = {
        f"{name}.{k}": v.detach().cpu().clone()
        for name in ("query_head", "page_head")
        for k, v in getattr(model, name).state_dict().items()
    }
    lora = {k: v.detach().cpu().clone() for k, v in lora_parameters(model).items()}
    return {"heads": heads, "lora": lora}


def lora_parameters(model: ColIntern) -> dict:
    """peft's checkpoint key -> the live LoRA parameter, the keys as get_peft_model_state_dict names them. peft is
    handed the LoRA parameters alone: without state_dict= it would take the whole backbone's state_dict(), and on a
    CPU with avx512_bf16 a bitsandbytes 4-bit layer repacks its weight for the CPU kernel at its first forward, and
    its state_dict() converts it back in place, lossily (with double quantisation, absmax is requantised): every
    save or load would then perturb the frozen backbone."""
    if model.lora is None:
        return {}
    from peft import get_peft_model_state_dict

    own = {name: p for name, p in model.backbone.named_parameters() if "lora_" in name}
    return get_peft_model_state_dict(model.backbone, state_dict=own, save_embedding_layers=False)


def checkpoint_quantization(meta: dict) -> str:
    """How the backbone a checkpoint was trained on was quantised; checkpoints from before --quantize: none."""
    return meta.get("quantize", "none")


def say_if_quantization_differs(meta: dict, quantize: str, source: str, say=print) -> None:
    """One line when heads + LoRA trained over one quantisation are loaded over another: allowed (LoRA sits beside
    the frozen weights, whatever their storage), but the backbone's outputs move by the quantisation error."""
    trained = checkpoint_quantization(meta)
    if quantize != trained:
        say(
            f"{source} was trained on a --quantize {trained} backbone and is loaded on a --quantize {quantize} one: "
            f"heads and LoRA load unchanged; scores may shift by the quantisation error"
        )


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a kill leaves the old file intact."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    path: str,
    model: ColIntern,
    step: int = 0,
    epoch: int = 0,
    train_state: dict | None = None,
    training_data: list | None = None,
):
    atomic_torch_save(checkpoint_dict(model, step, epoch, train_state, training_data), path)


def load_checkpoint(path: str) -> dict:
    """The one reader of trained models -> the checkpoint dict {"kind", "meta", "heads", "lora"} of a .pt file
    (train.py's), an exported folder (export.py's), or the hub id of an exported folder (downloaded)."""
    path = local_checkpoint(path)
    if os.path.isdir(path):
        ckpt = load_exported(path)
    elif not os.path.isfile(path):
        raise UserFileNotFoundError(f"checkpoint {path} does not exist")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load of a text file raises KeyError, of a cut-short one RuntimeError, ...
            raise UserValueError(
                f"{path} is not a ColIntern checkpoint (made by train.py): torch.load cannot read it"
            ) from e
        if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
            raise UserValueError(
                f"{path} is not a ColIntern checkpoint (made by train.py): it has no kind={CHECKPOINT_KIND!r} entry"
            )
    bad = first_non_finite(
        {**{f"heads.{k}": v for k, v in ckpt["heads"].items()}, **{f"lora.{k}": v for k, v in ckpt["lora"].items()}}
    )
    if bad is not None:
        raise UserValueError(
            f"{path}: {bad} holds non-finite values (inf or NaN): its scores would be garbage. The "
            f"run that wrote it diverged; use an earlier checkpoint"
        )
    return ckpt


def first_non_finite(tensors: dict) -> str | None:
    """The name of the first tensor holding an inf or a NaN, or None: one reduction (and one sync) over them all,
    the tensor-by-tensor search only once one is found."""
    values = [t for t in tensors.values() if t.is_floating_point() and t.numel()]
    if not values or torch.isfinite(torch.nn.utils.get_total_norm(values, norm_type=float("inf"))):
        return None
    return next(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())


# Checkpoints written before LoRA went through peft's get_peft_model_state_dict hold the backbone's own state_dict
# keys, which carry peft's adapter name: "language_model.layers.0.self_attn.q_proj.lora_A.default.weight" is now
# "language_model.layers.0.self_attn.q_proj.lora_A.weight". tests/data/checkpoint-lora-keys-v0.pt is one.
LORA_KEY_ADAPTER_NAME = re.compile(r"(\.lora_\w+)\.default(\.\w+)?$")


def load_trainable_state(model: ColIntern, ckpt: dict, source: str = "checkpoint") -> None:
    """Load heads + LoRA from a checkpoint dict into `model`, refusing one made for another shape or LoRA layout."""
    meta = ckpt["meta"]
    if meta["hidden_size"] != model.hidden_size:
        raise UserValueError(
            f"{source} was trained on a backbone with hidden size {meta['hidden_size']} "
            f"({meta['model_id']}), this backbone has {model.hidden_size} ({model.model_id}): "
            f"pass the matching --model_id"
        )
    if meta["proj_dim"] != model.proj_dim:
        raise UserValueError(
            f"{source} has proj_dim {meta['proj_dim']}, the model was built with {model.proj_dim}: "
            f"use --proj_dim {meta['proj_dim']} (or build the model from the checkpoint)"
        )
    if meta["format"]["version"] != FORMAT_VERSION:
        raise UserValueError(
            f"{source} uses query/page format v{meta['format']['version']}, this code uses "
            f"v{FORMAT_VERSION}: its embeddings would not match; retrain or use matching code"
        )
    lora = {LORA_KEY_ADAPTER_NAME.sub(r"\1\2", k): v for k, v in ckpt["lora"].items()}  # older checkpoints' keys
    own_lora = lora_parameters(model)
    own, theirs = set(own_lora), set(lora)
    if own != theirs:
        raise UserValueError(
            f"{source} LoRA layout does not match the model: {len(theirs - own)} checkpoint keys "
            f"have no place (e.g. {sorted(theirs - own)[:2]}), {len(own - theirs)} model keys are "
            f"missing (e.g. {sorted(own - theirs)[:2]}). Build the model with the checkpoint's "
            f"LoRA settings {meta['lora']}"
        )
    wrong = [k for k in sorted(lora) if lora[k].shape != own_lora[k].shape]
    if wrong:
        raise UserValueError(
            f"{source} LoRA adapter does not fit the backbone {model.model_id}: {len(wrong)} tensors "
            f"have other shapes (e.g. {wrong[0]}: {tuple(lora[wrong[0]].shape)}, the model's "
            f"{tuple(own_lora[wrong[0]].shape)}), with LoRA settings {meta['lora']}"
        )
    for name in ("query_head", "page_head"):
        head = getattr(model, name)
        state = {k.split(".", 1)[1]: v for k, v in ckpt["heads"].items() if k.startswith(name + ".")}
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        if shapes != expected:
            raise UserValueError(
                f"{source} heads do not fit the backbone {model.model_id}: {name} holds {shapes}, "
                f"the model's {expected} (hidden size {model.hidden_size}, proj_dim "
                f"{model.proj_dim}): pass the matching --model_id (hidden size) or --proj_dim"
            )
        head.load_state_dict(state)
    with torch.no_grad():  # copied into place, not through peft's set_peft_model_state_dict: see lora_parameters
        for key, param in own_lora.items():
            param.copy_(lora[key])


# -----------------------------------------------------------------------------
# Exported folders (export.py): a trained model as `hf upload` shares it, safetensors and JSON only
#     adapter_config.json, adapter_model.safetensors  LoRA as peft's own files: PeftModel.from_pretrained(backbone,
#                                                     folder) reads them; base_model_name_or_path = the backbone id
#     heads.safetensors                               query_head.* and page_head.*
#     colintern_config.json                           {"kind", "export_version", "name", **the checkpoint's meta}
# load_checkpoint reads such a folder back into the same checkpoint dict a .pt holds.

EXPORT_VERSION = 1
EXPORT_CONFIG = "colintern_config.json"
HEADS_FILE = "heads.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # PeftModel.save_pretrained's keys: the PeftModel's own parameter names


def lora_config(settings: dict, base_model: str):
    """peft's LoraConfig of ColIntern's LoRA settings (dataclasses.asdict of LoraSettings)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"],
        bias="none",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )


def write_exported(ckpt: dict, folder: str, name: str, base_model: str | None = None) -> dict:
    """Write a checkpoint dict into `folder` (which exists) as an exported folder; -> its colintern_config.json.
    `base_model` replaces meta["model_id"] (the hub id of the backbone a local copy was trained from). Every meta
    key travels, so what newer code records in a checkpoint reaches the folder without changes here."""
    from safetensors.torch import save_file

    meta = dict(ckpt["meta"], model_id=base_model or ckpt["meta"]["model_id"])
    save_file(
        {k: v.contiguous() for k, v in ckpt["heads"].items()},
        os.path.join(folder, HEADS_FILE),
        metadata={"format": "pt"},
    )
    if meta["lora"]:
        lora_config(meta["lora"], meta["model_id"]).save_pretrained(folder)
        lora = {
            PEFT_KEY_PREFIX + LORA_KEY_ADAPTER_NAME.sub(r"\1\2", k): v.contiguous() for k, v in ckpt["lora"].items()
        }
        save_file(lora, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"kind": CHECKPOINT_KIND, "export_version": EXPORT_VERSION, "name": name, **meta}
    write_json(os.path.join(folder, EXPORT_CONFIG), config)
    return config


def read_json_file(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserFileNotFoundError(
            f"{path} is missing: the folder is not a complete ColIntern export ({what})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserValueError(f"{path} is not valid JSON ({e}): the folder is corrupted; export it again") from e


def read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path} is missing: the folder is not a complete ColIntern export")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError on a cut-short or garbled file
        raise UserValueError(
            f"{path} cannot be read as safetensors ({' '.join(str(e).split())}): the file is "
            f"corrupted; download or export it again"
        ) from e


def load_exported(folder: str) -> dict:
    """An exported folder -> the checkpoint dict. LoRA settings and the backbone id come from peft's
    adapter_config.json (what PeftModel.from_pretrained would use) and must agree with colintern_config.json."""
    checkpoints = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))
    if checkpoints and not os.path.isfile(os.path.join(folder, EXPORT_CONFIG)):  # train.py's --out_dir, say
        raise UserFileNotFoundError(
            f"{folder} is a folder of checkpoints, not an exported model: pass one of its "
            f"files, e.g. {os.path.join(folder, checkpoints[-1])} (it holds "
            f"{', '.join(checkpoints[:6])}{' ...' if len(checkpoints) > 6 else ''})"
        )
    config = read_json_file(os.path.join(folder, EXPORT_CONFIG), "export.py writes colintern_config.json")
    if config.get("kind") != CHECKPOINT_KIND or config.get("export_version") != EXPORT_VERSION:
        raise UserValueError(
            f"{os.path.join(folder, EXPORT_CONFIG)} is not a ColIntern export of version "
            f"{EXPORT_VERSION} (kind {config.get('kind')!r}, export_version "
            f"{config.get('export_version')!r})"
        )
    meta = {k: v for k, v in config.items() if k not in ("kind", "export_version")}
    lora = {}
    if meta.get("lora"):
        adapter = read_json_file(os.path.join(folder, ADAPTER_CONFIG), "the LoRA adapter's peft config")
        theirs = {
            "r": adapter.get("r"),
            "alpha": adapter.get("lora_alpha"),
            "dropout": adapter.get("lora_dropout"),
            "target_modules": adapter.get("target_modules"),
        }
        ours = {k: meta["lora"].get(k) for k in theirs}
        if adapter.get("peft_type") != "LORA" or theirs != ours:
            raise UserValueError(
                f"{os.path.join(folder, ADAPTER_CONFIG)} does not match {EXPORT_CONFIG}: the adapter "
                f"is {adapter.get('peft_type')} {theirs}, the model was trained with LoRA {ours}"
            )
        meta["model_id"] = adapter.get("base_model_name_or_path") or meta["model_id"]
        weights = read_safetensors(os.path.join(folder, ADAPTER_WEIGHTS))
        outside = [k for k in weights if not k.startswith(PEFT_KEY_PREFIX)]
        if outside:
            raise UserValueError(
                f"{os.path.join(folder, ADAPTER_WEIGHTS)} holds keys outside peft's "
                f"{PEFT_KEY_PREFIX!r} naming (e.g. {outside[0]}): not a peft adapter of this model"
            )
        lora = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in weights.items()}
    heads = read_safetensors(os.path.join(folder, HEADS_FILE))
    return {"kind": CHECKPOINT_KIND, "meta": meta, "heads": heads, "lora": lora}


def load_trained(path_or_id: str, **kwargs):
    """-> (model, processor) of a trained ColIntern: a .pt checkpoint, an exported folder or its hub id.
    Keywords go to ColIntern.from_checkpoint (model_id overrides the backbone, dtype, device_map, max_tiles)."""
    model, processor, _ = ColIntern.from_checkpoint(path_or_id, **kwargs)
    return model, processor


# -----------------------------------------------------------------------------
# The exact search's blocks of queries, which ranks split (colintern_launch runs the ranks)


def query_blocks(lengths: Sequence[int], query_block_tokens: int) -> list:
    """maxsim_topk's blocks of queries, [(q0, q1), ...]: greedy runs of about query_block_tokens tokens. A run of
    whole blocks sliced out of a list is blocked the same way again, which is what lets ranks split queries at
    block boundaries and multiply exactly the matrices one process would."""
    blocks, q0 = [], 0
    while q0 < len(lengths):
        q1, n_tokens = q0, 0
        while q1 < len(lengths) and (q1 == q0 or n_tokens + lengths[q1] <= query_block_tokens):
            n_tokens += lengths[q1]
            q1 += 1
        blocks.append((q0, q1))
        q0 = q1
    return blocks
