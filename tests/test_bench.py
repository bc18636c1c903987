"""bench/: gpu.sh --quick end to end on the CPU (the packages the GPU machine lacks blocked), bench_train's argument
checks, and its FLOP count against torch's own counter."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from keyword_pages import render_keyword_page

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_train  # noqa: E402
import make_tiny_model  # noqa: E402
from colintern_model import ColIntern, ColInternProcessor, LoraSettings  # noqa: E402

# What the GPU machine does not have: every bench must run without importing them at module load. The MaxSim peers
# too, so that the output does not depend on whether bench/requirements.txt was installed here.
GPU_MACHINE_LACKS = "bitsandbytes,datasets,faiss,mteb,colpali_engine,maxsim_cpu"


@pytest.mark.slow
def test_gpu_sh_quick_prints_every_figure_and_skips_what_is_missing(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, COLINTERN_BENCH_MISSING=GPU_MACHINE_LACKS,
               COLINTERN_BENCH_WHEELS=str(tmp_path / "no_wheels"), COLINTERN_BENCH_LOGS=str(tmp_path / "logs"),
               CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    done = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for module in GPU_MACHINE_LACKS.split(",")[:3]:
        assert f"package {module}: MISSING (treated as missing" in out
    number = r"[0-9.]+(?:e[+-]?\d+)?"
    expected = [
        rf"^\[a\] C    4 micro   2 cached \(2 x 2 queries\): step +{number} s, +{number} samples/s, peak RSS +{number} "
        rf"MiB, \+ *-?{number} MiB over the {number} MiB before the step, growth x{number} vs C 4 cached$",
        rf"^\[a\] C    8 micro   2 cached \(4 x 2 queries\): .* growth x-?{number} vs C 4 cached$",
        r"^\[a\] C    4 micro   4 plain  \(1 x 4 queries\): .* growth x1.00 vs C 4 plain, x-?[0-9.]+ with caching$",
        rf"^\[a\] expected C 8: embeddings \(values \+ grads\) 8 x \(Lq \d+ \+ 1 x Lp \d+\) x D 128 x 4 B x 2 = "
        rf"{number} MiB; loss .* together {number} MiB$",
        rf"^\[b\] colintern fp32: {number} s, {number} GFLOP/s .* top-10 identical to the reference for 100% of "
        r"queries$",
        rf"^\[b\] colintern-topk bf16: {number} s, {number} GFLOP/s",
        r"^\[b\] colpali-engine: skipped, not installed",
        r"^\[b\] maxsim-cpu: skipped, not installed",
        rf"^\[c\] processing \(ColInternProcessor.process_pages, one CPU thread\): {number} pages/s",
        rf"^\[c\] model \(forward_pages \+ unpad to fp16, pages processed ahead\): {number} pages/s, \d+ page tokens/s",
        rf"^\[c\] ColIntern.encode_pages end to end \(processing inline, one thread\): {number} pages/s$",
        r"^skip: the recipe's optimizer paged_adamw_8bit \(bitsandbytes missing\)",
        r"^skip: colpali-engine peer wheel \(no colpali_engine-\*\.whl in .*no_wheels/",
        r"^skip: \(d\) mining end to end through mine_hard_negatives.py \(needs datasets faiss, missing\)$",
        r"^gpu.sh: done in \d+ s: \(a\) ok in \d+ s; \(b\) ok in \d+ s; \(c\) ok in \d+ s; \(d\) skipped",
    ]
    missing = [p for p in expected if not re.search(p, out, flags=re.MULTILINE)]
    assert not missing, f"lines not printed: {missing}\n--- output:\n{out}"
    assert (tmp_path / "logs" / "a.out").read_text() in re.sub(r"(?m)^\[a\] ", "", out)


@pytest.mark.parametrize("argv, message", [
    (["--contrastive", "4,6", "--micro", "4"], r"--contrastive \[4, 6\]: each C must be a multiple of --micro 4"),
    (["--plain", "4"], "--plain compares against --contrastive"),
])
def test_bench_train_contrastive_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_forward_flops_match_torch_flop_counter():
    """The MFU numerator against torch's count of the matmuls, convolutions and attention a forward runs (one
    sequence per batch, so no padding, which the formula leaves out; eager attention, whose matmuls the counter
    sees: it has no formula for the CPU's fused SDPA kernel)."""
    backbone, hf_processor = make_tiny_model.build("tiny", tile=224, seed=0)
    backbone.set_attn_implementation("eager")
    processor = ColInternProcessor(hf_processor, max_tiles=4)
    model = ColIntern(backbone, lora=LoraSettings(r=4, alpha=4, dropout=0.0), max_tiles=4,
                      **processor.pixel_normalisation()).eval()
    for inputs, forward in ((processor.process_pages([render_keyword_page("flops", (448, 224))]), model.forward_pages),
                            (processor.process_queries(["Which page counts flops?"]), model.forward_queries)):
        vision, lm, tokens = bench_train.forward_flops(model, inputs)
        ours = vision + lm + 2 * model.hidden_size * model.proj_dim * inputs["input_ids"].shape[1]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(inputs)
        assert ours == pytest.approx(counter.get_total_flops(), rel=0.01)
