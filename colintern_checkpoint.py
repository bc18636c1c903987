"""Trained models on disk: .pt checkpoints (train.py) and exported folders (export.py), read back into one
checkpoint dict. File formats only: colintern_model turns a checkpoint dict into a ColIntern."""

import json
import os
import re

import torch

from colintern_cli import UserFileNotFoundError, UserValueError
from colintern_data import atomic_path, local_checkpoint, write_json

# -----------------------------------------------------------------------------
# Checkpoints: one .pt dict, loadable with weights_only=True
#     {"kind": "colintern", "meta": {...}, "heads": {...}, "lora": {...}, "train_state": {...} (train.py only)}
# Only what training changes is saved, the heads and LoRA: the frozen backbone comes from meta["model_id"].


CHECKPOINT_KIND = "colintern"


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
