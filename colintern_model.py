"""ColIntern: InternVL3.5 as a ColPali-style late-interaction page retriever. The model itself: the backbone, the
query/page formats and their processor, the ColIntern module (LoRA + projection heads, every token a unit vector),
and its trained parts saved and loaded. The siblings: colintern_scoring (exact MaxSim, pooling), colintern_loss (the
training loss, gradient caching), colintern_checkpoint (the files), colintern_launch (many processes).

    from colintern_model import ColIntern, LoraSettings, save_checkpoint
    from colintern_scoring import maxsim_scores
    model, processor = ColIntern.from_pretrained("OpenGVLab/InternVL3_5-1B-HF", lora=LoraSettings())
    q = model.encode_queries(processor, ["Which page shows revenue?"])      # list of (Lq, D)
    p = model.encode_pages(processor, [Image.open("page.png")])             # list of (Lp, D)
    scores = maxsim_scores(q, p)                                            # (Nq, Np)
    save_checkpoint("ck.pt", model)                                         # heads + LoRA
    model, processor, ckpt = ColIntern.from_checkpoint("ck.pt")
"""

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from colintern_checkpoint import (
    CHECKPOINT_KIND,
    LORA_KEY_ADAPTER_NAME,
    atomic_torch_save,
    checkpoint_quantization,
    load_checkpoint,
    say_if_quantization_differs,
)
from colintern_cli import (
    UserFileNotFoundError,
    UserOSError,
    UserRuntimeError,
    UserValueError,
    looks_like_local_path,
    progress_bar,
)
from colintern_data import backbone_fingerprint, open_image, tensors_digest
from colintern_scoring import dtype_by_name, dtype_name, gpu_dtype

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
    check_quantize(quantize)
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        on_gpu = device is not None and str(device) != "cpu" and torch.cuda.is_available()
        if not on_gpu:
            return torch.float32 if quantize == "none" else torch.bfloat16
        return gpu_dtype()
    else:
        resolved = dtype_by_name(dtype)
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
            f"unnormalised pixel_values are {pixels.dtype} with fractional values: the image processor did not "
            "return resized uint8 pixels, so they cannot be sent as uint8"
        )
    if pixels.numel() and (pixels.min() < 0 or pixels.max() > 255):
        raise UserValueError(
            f"unnormalised pixel_values span {pixels.min().item()}..{pixels.max().item()}, not 0..255: the image "
            "processor rescaled or normalised them after all"
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
        model.load_trainable_state(ckpt, source=f"checkpoint {path}")
        return model, processor, ckpt

    def load_trainable_state(self, ckpt: dict, source: str = "checkpoint") -> None:
        """Load heads + LoRA from a checkpoint dict, refusing one made for another shape or LoRA layout."""
        meta = ckpt["meta"]
        if meta["hidden_size"] != self.hidden_size:
            raise UserValueError(
                f"{source} was trained on a backbone with hidden size {meta['hidden_size']} "
                f"({meta['model_id']}), this backbone has {self.hidden_size} ({self.model_id}): "
                f"pass the matching --model_id"
            )
        if meta["proj_dim"] != self.proj_dim:
            raise UserValueError(
                f"{source} has proj_dim {meta['proj_dim']}, the model was built with {self.proj_dim}: "
                f"use --proj_dim {meta['proj_dim']} (or build the model from the checkpoint)"
            )
        if meta["format"]["version"] != FORMAT_VERSION:
            raise UserValueError(
                f"{source} uses query/page format v{meta['format']['version']}, this code uses "
                f"v{FORMAT_VERSION}: its embeddings would not match; retrain or use matching code"
            )
        lora = {LORA_KEY_ADAPTER_NAME.sub(r"\1\2", k): v for k, v in ckpt["lora"].items()}  # older checkpoints' keys
        own_lora = lora_parameters(self)
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
                f"{source} LoRA adapter does not fit the backbone {self.model_id}: {len(wrong)} tensors "
                f"have other shapes (e.g. {wrong[0]}: {tuple(lora[wrong[0]].shape)}, the model's "
                f"{tuple(own_lora[wrong[0]].shape)}), with LoRA settings {meta['lora']}"
            )
        for name in ("query_head", "page_head"):
            head = getattr(self, name)
            state = {k.split(".", 1)[1]: v for k, v in ckpt["heads"].items() if k.startswith(name + ".")}
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
            if shapes != expected:
                raise UserValueError(
                    f"{source} heads do not fit the backbone {self.model_id}: {name} holds {shapes}, "
                    f"the model's {expected} (hidden size {self.hidden_size}, proj_dim "
                    f"{self.proj_dim}): pass the matching --model_id (hidden size) or --proj_dim"
                )
            head.load_state_dict(state)
        with torch.no_grad():  # copied into place, not through peft's set_peft_model_state_dict: see lora_parameters
            for key, param in own_lora.items():
                param.copy_(lora[key])

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
        return tensors_digest(
            (name, p)
            for name, p in sorted(self.named_parameters())
            if "lora_" in name or name.startswith(("query_head.", "page_head."))
        )

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
# Saving and loading the trained parts: heads + LoRA as a checkpoint dict (colintern_checkpoint writes and reads
# the files), and back into a model


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


def save_checkpoint(
    path: str,
    model: ColIntern,
    step: int = 0,
    epoch: int = 0,
    train_state: dict | None = None,
    training_data: list | None = None,
):
    atomic_torch_save(checkpoint_dict(model, step, epoch, train_state, training_data), path)


def load_trained(path_or_id: str, **kwargs):
    """-> (model, processor) of a trained ColIntern: a .pt checkpoint, an exported folder or its hub id.
    Keywords go to ColIntern.from_checkpoint (model_id overrides the backbone, dtype, device_map, max_tiles)."""
    model, processor, _ = ColIntern.from_checkpoint(path_or_id, **kwargs)
    return model, processor
