"""bench/: gpu.sh --quick end to end on the CPU (the packages the GPU machine lacks blocked) and its section selection,
bench_train's argument checks, and its FLOP counts (model and executed, LoRA apart) against torch's own counter and
an independent sum."""

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from torch.utils.flop_counter import FlopCounterMode

import colintern_loss as cl
import make_tiny_model  # noqa: E402
from bench import bench_train
from colintern_model import ColIntern, ColInternProcessor, LoraSettings  # noqa: E402
from make_synthetic_data import render_keyword_page

# What the GPU machine does not have: every bench must run without importing them at module load. The MaxSim peers
# too, so that the output does not depend on whether bench/requirements.txt was installed here.
GPU_MACHINE_LACKS = "bitsandbytes,datasets,faiss,mteb,colpali_engine,maxsim_cpu"


def run_gpu_sh(tmp_path, *argv):
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        COLINTERN_BENCH_MISSING=GPU_MACHINE_LACKS,
        COLINTERN_BENCH_WHEELS=str(tmp_path / "no_wheels"),
        COLINTERN_BENCH_LOGS=str(tmp_path / "logs"),
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu.sh"), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


NUMBER = r"[0-9.]+(?:e[+-]?\d+)?"


@pytest.mark.slow
def test_gpu_sh_quick_prints_every_figure_and_skips_what_is_missing(tmp_path):
    done = run_gpu_sh(tmp_path, "--quick")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for module in GPU_MACHINE_LACKS.split(",")[:3]:
        assert f"package {module}: MISSING (treated as missing" in out
    number = NUMBER
    flops = (
        rf"model ({number}) GFLOP \(vision {number}, language model {number}, LoRA {number}, heads {number}, "
        rf"loss {number}\), executed ({number}) GFLOP \(x({number})\)$"
    )
    expected = [
        r"^mode quick \(tiny model\), sections a b c d e f, device cpu, logs in ",
        r"^\[a\] measured bf16 matmul peak n/a on cpu \(MFU and HFU are printed on CUDA only\)$",
        r"^\[a\] contrastive mode: .*; per configuration 1 warm-up step\(s\) at its shape, then 2 timed step\(s\), "
        r"median$",
        rf"^\[a\] C    4 micro   2 cached \(2 x 2 queries\): step +{number} s, +{number} samples/s, peak RSS +{number} "
        rf"MiB, \+ *-?{number} MiB over the {number} MiB before the step, growth x{number} vs C 4 cached$",
        rf"^\[a\] C    8 micro   2 cached \(4 x 2 queries\): .* growth x-?{number} vs C 4 cached$",
        r"^\[a\] C    4 micro   4 plain  \(1 x 4 queries\): .* growth x1.00 vs C 4 plain, x-?[0-9.]+ with caching$",
        rf"^\[a\] C    4 micro   2 cached FLOPs: {flops}",
        rf"^\[a\] C    4 micro   4 plain  FLOPs: {flops}",
        rf"^\[a\] C    8 micro   2 cached FLOPs: {flops}",
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
        r"^gpu.sh: done in \d+ s: \(a\) ok in \d+ s; \(b\) ok in \d+ s; \(c\) ok in \d+ s; \(d\) skipped \(datasets "
        r"faiss missing\); \(e\) skipped \(quick mode\); \(f\) skipped \(needs 8 GPUs\)$",
    ]
    missing = [p for p in expected if not re.search(p, out, flags=re.MULTILINE)]
    assert not missing, f"lines not printed: {missing}\n--- output:\n{out}"
    assert (tmp_path / "logs" / "a.out").read_text() in re.sub(r"(?m)^\[a\] ", "", out)
    assert not re.search(r"(?m)^\[a\] .*(MFU|HFU) \d", out), "MFU printed on a CPU"
    # C 4 needs the same model FLOPs cached or plain; caching executes more (each micro-batch encoded twice)
    cached, plain = (
        re.search(rf"(?m)^\[a\] C    4 micro   {m} FLOPs: {flops}", out).groups() for m in ("2 cached", "4 plain ")
    )
    assert cached[0] == plain[0] and float(cached[1]) > float(plain[1])
    for model, executed, ratio in (cached, plain):
        assert float(ratio) == pytest.approx(float(executed) / float(model), abs=0.01)


@pytest.mark.slow
def test_gpu_sh_runs_only_the_selected_sections(tmp_path):
    done = run_gpu_sh(tmp_path, "--quick", "b")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"(?m)^mode quick \(tiny model\), sections b, ", out), out
    assert re.search(
        r"(?m)^gpu.sh: done in \d+ s: \(a\) not selected; \(b\) ok in \d+ s; \(c\) not selected; "
        r"\(d\) not selected; \(e\) not selected; \(f\) not selected$",
        out,
    ), out
    assert not re.search(r"(?m)^(\[[acdef]\]|== \([acdef]\)|skip: \([acdef]\)|skip: the recipe)", out), out
    assert sorted(os.listdir(tmp_path / "logs")) == ["b.err", "b.out"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quick", "b", "x"], r"gpu.sh: unknown section 'x': sections are the letters a b c d e f, one per argument"),
        (["ab"], r"gpu.sh: unknown section 'ab'"),
        (["--sections"], r"gpu.sh: unknown option --sections \(options: --quick, --help\)"),
    ],
)
def test_gpu_sh_refuses_an_unknown_section_before_running_anything(tmp_path, argv, message):
    done = run_gpu_sh(tmp_path, *argv)
    assert done.returncode == 2
    assert done.stdout == "" and re.fullmatch(message + r".*\n", done.stderr), done.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contrastive", "4,6", "--micro", "4"], r"--contrastive \[4, 6\]: each C must be a multiple of --micro 4"),
        (["--plain", "4"], "--plain compares against --contrastive"),
    ],
)
def test_bench_train_contrastive_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def lora_model(checkpointing=False):
    """The tiny model with LoRA r 4 (no dropout), eager attention (whose matmuls torch's counter sees: it has no
    formula for the CPU's fused SDPA kernel), and its processor."""
    backbone, hf_processor = make_tiny_model.build("tiny", tile=224, seed=0)
    backbone.set_attn_implementation("eager")
    processor = ColInternProcessor(hf_processor, max_tiles=4)
    model = ColIntern(
        backbone, lora=LoraSettings(r=4, alpha=4, dropout=0.0), max_tiles=4, **processor.pixel_normalisation()
    )
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, processor


def lora_flops_from_weights(model) -> float:
    """LoRA's forward FLOPs a token from its weights: x A^T is 2 r in, then B 2 r out (A is (r, in), B (out, r))."""
    return sum(2.0 * p.numel() for name, p in model.backbone.named_parameters() if ".lora_" in name)


def test_forward_flops_match_torch_flop_counter():
    """The MFU numerator's forward, LoRA apart, against torch's count of the matmuls, convolutions and attention a
    forward runs (one sequence per batch, so no padding, which the formula leaves out)."""
    model, processor = lora_model()
    model.eval()
    for inputs, forward in (
        (processor.process_pages([render_keyword_page("flops", (448, 224))]), model.forward_pages),
        (processor.process_queries(["Which page counts flops?"]), model.forward_queries),
    ):
        vision, lm, tokens = bench_train.forward_flops(model, inputs)
        assert tokens == inputs["input_ids"].shape[1]
        lora = bench_train.lora_flops_per_token(model) * tokens
        ours = vision + lm + lora + 2 * model.hidden_size * model.proj_dim * tokens
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(inputs)
        assert ours == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_lora_flops_are_counted_apart_from_the_language_model():
    """LoRA's FLOPs a token equal 2 r (in + out) summed over the adapters' own weights, on the seven projections of
    every layer; the language model's count leaves them out (it is what a model without LoRA counts)."""
    model, processor = lora_model()
    layers = model.backbone.config.text_config.num_hidden_layers
    assert len(bench_train.lora_layers(model)) == 7 * layers
    assert bench_train.lora_flops_per_token(model) == lora_flops_from_weights(model) > 0
    bare, _ = make_tiny_model.build("tiny", tile=224, seed=0)
    bare = ColIntern(bare, lora=None, max_tiles=4, **processor.pixel_normalisation())
    queries = processor.process_queries(["Which page counts flops?"])
    assert bench_train.forward_flops(model, queries) == bench_train.forward_flops(bare, queries)
    assert bench_train.lora_flops_per_token(bare) == 0


def test_executed_flops_add_the_forwards_run_again():
    """Executed = model FLOPs + the forwards that run again: gradient caching encodes each micro-batch twice
    (language model, LoRA and heads; the vision tower once), checkpointing recomputes the language model and LoRA.
    Cached + checkpointed: vision + 3 (language model + LoRA) + 2 heads + loss forwards + backward, whose loss page
    gradients run as a matmul the size of the loss's forward. The forwards here from forward_flops and LoRA's weights,
    the backward (model FLOPs less the forwards) against torch's counter in the next test."""
    model, processor = lora_model()
    micro_batches, _ = bench_train.make_batches(processor, 2, 1, (448, 224), n=2)  # 2 x (2 queries + 2 negatives)
    f = bench_train.step_flops(model, micro_batches)
    vision = lm = 0.0
    tokens = 0
    for inputs in [x for b in micro_batches for x in (b["queries"], b["pages"])]:
        v, w, t = bench_train.forward_flops(model, inputs)
        vision, lm, tokens = vision + v, lm + w, tokens + t
    lora = lora_flops_from_weights(model) * tokens
    heads = 2.0 * model.hidden_size * model.proj_dim * tokens
    lq = max(b["queries"]["input_ids"].shape[1] for b in micro_batches)
    lp = max(b["pages"]["input_ids"].shape[1] for b in micro_batches)
    loss = 2.0 * 4 * 8 * lq * lp * model.proj_dim  # C 4 queries x Np 8 pages (4 positives + 4 negatives)
    assert (f.vision, f.lm, f.lora, f.heads, f.loss) == pytest.approx((vision, lm, lora, heads, loss), rel=1e-12)
    backward = bench_train.model_flops(f) - (vision + lm + lora + heads + loss)
    assert backward > lm  # the language model's input gradients, its attention's twice, LoRA's, the heads'
    for caching, checkpointing in itertools.product((False, True), repeat=2):
        passes = 1 + caching + checkpointing
        expected = vision + passes * (lm + lora) + (1 + caching) * heads + loss + backward + loss  # + page gradients
        assert bench_train.executed_flops(f, caching, checkpointing) == pytest.approx(expected, rel=1e-12)
    assert bench_train.executed_flops(f, True, True) == pytest.approx(
        vision + 3 * (lm + lora) + 2 * heads + 2 * loss + backward, rel=1e-12
    )


def model_work(counter: FlopCounterMode) -> int:
    """torch's count less RoPE's angle table, an outer product of positions and frequencies, not model work (a bmm
    in transformers 5.17's rotary embedding, elementwise in later ones)."""
    rope = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(".rotary_emb"))
    return counter.get_total_flops() - rope


@pytest.mark.parametrize("checkpointing", [False, True])
def test_step_flops_match_torch_flop_counter(checkpointing):
    """One plain training step (forward, loss, backward) counted by torch, against executed FLOPs: the model FLOPs'
    backward (input gradients through the frozen language model, less the first layer's q, k, v whose input needs
    none; LoRA's and the heads' input and weight gradients; the loss's query gradients) and, with checkpointing, the
    recomputed layers. Two queries and two pages of equal lengths, so that nothing is padded."""
    model, processor = lora_model(checkpointing)
    model.train()
    batches, _ = bench_train.make_batches(processor, 2, 0, (448, 224), n=1)
    assert all(bool(b[k]["attention_mask"].all()) for b in batches for k in ("queries", "pages"))
    f = bench_train.step_flops(model, batches)
    with FlopCounterMode(display=False) as counter:
        cl.step_forward_backward(cl.QueryPageEncoder(model), batches, cl.StepLoss(0.02))
    executed = bench_train.executed_flops(f, False, checkpointing)
    if checkpointing:  # torch stops each layer's recomputation before down_proj's LoRA B, which backward does not need
        tokens = sum(int(b[k]["attention_mask"].sum()) for b in batches for k in ("queries", "pages"))
        executed -= sum(
            2.0 * layer.mlp.down_proj.lora_B["default"].weight.numel() * tokens
            for layer in model.backbone.language_model.layers
        )
    else:  # a plain step runs what the model needs, and the loss's page gradients as a matmul (forward-sized)
        assert executed == bench_train.model_flops(f) + f.loss == bench_train.model_flops(f) + f.loss_pages_backward
    assert model_work(counter) == pytest.approx(executed, rel=1e-9)


def test_flops_lines_name_mfu_and_hfu_against_both_peaks():
    """The CUDA lines, on hand-made parts: model 105 + (100 + 100 + 20 - 20) + 3 x 10 + 3 x 80 + 25 = 600 TFLOP,
    executed (cached + checkpointed) 600 + (100 + 10 + 80) + (100 + 10) = 900; in 2 s, 300 and 450 TFLOP/s: MFU 30% of
    a 1000 datasheet peak and 50% of a measured 600, HFU 45% and 75%."""
    f = bench_train.StepFlops(
        vision=105e12,
        lm=100e12,
        attention=20e12,
        lora=10e12,
        heads=80e12,
        loss=25e12,
        loss_backward=0.0,
        loss_pages_backward=0.0,
        skipped=(20e12, 0.0),
        lora_on=True,
    )
    assert bench_train.model_flops(f) == pytest.approx(600e12)
    executed = bench_train.executed_flops(f, True, True)
    assert executed == pytest.approx(900e12)
    flops, mfu = bench_train.flops_lines("C 256", f, executed, 2.0, (1000.0, 600.0))
    assert flops == (
        "C 256 FLOPs: model 600 TFLOP (vision 105, language model 200, LoRA 30, heads 240, loss 25), "
        "executed 900 TFLOP (x1.50)"
    )
    assert mfu == (
        "C 256 MFU 30.0% of datasheet 1000, 50.0% of measured 600 TFLOP/s (model 300.0 TFLOP/s); "
        "HFU 45.0% of datasheet, 75.0% of measured (executed 450.0 TFLOP/s)"
    )
    assert bench_train.flops_lines("C 256", f, executed, 2.0, (1000.0, None)) == [flops]  # a CPU: no peak measured


def test_measured_matmul_peak_times_the_matmul():
    """On a small CPU matmul: a positive rate, and that of 2 n^3 FLOPs a matmul (a slower clock says less)."""
    start = bench_train.time.perf_counter()
    peak = bench_train.measured_matmul_peak(torch.device("cpu"), n=64, reps=4)
    elapsed = bench_train.time.perf_counter() - start
    assert peak >= 2 * 64**3 * 4 / elapsed / 1e12 > 0


def test_padding_cost_against_a_hand_count():
    """bench_padding's factor, counted by hand over real lengths 1 + 3 + 3 + 5 = 12 (squares: 44). Batches of two:
    [5, 1] [3, 3] run 2 x 5 + 2 x 3 = 16 tokens; sorted, [1, 3] [3, 5] run 2 x 3 + 2 x 5 = 16 as well, and
    2 x 9 + 2 x 25 = 68 attention pairs. Batches of three: [5, 1, 3] [3] run 15 + 3 = 18, sorted [1, 3, 3] [5] 9 + 5."""
    from bench import bench_padding

    assert bench_padding.padded_cost([5, 1, 3, 3], 2) == pytest.approx(16 / 12)
    assert bench_padding.padded_cost([1, 3, 3, 5], 2, power=2) == pytest.approx(68 / 44)
    assert bench_padding.padded_cost([5, 1, 3, 3], 3) == pytest.approx(18 / 12)
    assert bench_padding.padded_cost([1, 3, 3, 5], 3) == pytest.approx(14 / 12)
    assert bench_padding.padded_cost([5, 5, 5], 2) == 1.0
