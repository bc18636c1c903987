"""Writes tests/data/checkpoint-lora-keys-v0.pt, a checkpoint in the layout train.py wrote before ColIntern saved
LoRA through peft's get_peft_model_state_dict: LoRA keys are backbone state_dict keys with peft's adapter name,
e.g. "language_model.layers.0.self_attn.q_proj.lora_A.default.weight".

It was made once, at commit 2e7b701 (the last one with the old key layout), from the repository root:

    .venv/bin/python tests/data/make_old_checkpoint.py

on the tiny model of tests/conftest.py's tiny_model_dir (make_tiny_model.build("tiny", tile=224, seed=0)) with
the default LoraSettings and proj_dim. Every trainable tensor (LoRA A and B, both heads) is set to seeded random
values, so a load that drops or misplaces any of them changes the scores. Running this script with newer code
writes the newer layout: keep the committed file, it is the old layout that test_colintern_model.py checks.
"""

import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import make_tiny_model  # noqa: E402
from colintern_model import ColIntern, LoraSettings, save_checkpoint  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint-lora-keys-v0.pt")

with tempfile.TemporaryDirectory() as folder:
    backbone, processor = make_tiny_model.build("tiny", tile=224, seed=0)
    backbone.save_pretrained(folder)
    processor.save_pretrained(folder)
    torch.manual_seed(0)
    model, _ = ColIntern.from_pretrained(folder, lora=LoraSettings())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    model.model_id = "tiny_model_dir"  # not the temporary folder: the test passes its own tiny model as model_id
    save_checkpoint(OUT, model, step=3, epoch=1)
print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")
