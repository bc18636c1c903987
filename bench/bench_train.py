r"""Training throughput and peak memory of train.py's step (forward, InfoNCE over MaxSim, backward, AdamW).

    python bench/bench_train.py                                   # tiny model on CPU (seconds)
    python bench/bench_train.py --size 1b --device cuda           # InternVL3.5-1B shapes, random weights, on a GPU
    python bench/bench_train.py --size 1b --device cuda --batch_sizes 8,16,32,64 --max_tiles 4
    # gradient caching (train.py --grad_accum): one optimizer step at contrastive batches C, as C/--micro cached
    # micro-batches, against plain batches of C
    python bench/bench_train.py --contrastive 4,8,16 --micro 2 --plain 4,8
    python bench/bench_train.py --size 1b --device cuda --contrastive 32,256 --micro 16 --plain 32 \
        --gradient_checkpointing --lora_dropout 0.1 --steps 5 --warmup 1        # what bench/gpu.sh (a) runs

Default mode: sweeps batch size x gradient checkpointing {off, on} x LoRA {off, on}, one line per configuration:
samples/s (queries per second, each with its positive page; collation excluded, as DataLoader workers do it in
parallel), peak memory (CUDA: max_memory_allocated; CPU: peak RSS of this process, VmHWM, reset before each
configuration) and the ratio to heads-only without checkpointing at that batch, then the configuration's FLOPs and
(CUDA) MFU/HFU lines, as below. Also prints how many samples/s one DataLoader worker collates (decode is free
here: pages are in memory).

FLOPs per step, with P = weights in the linear layers of a tower (LoRA's apart), T = its real tokens (padding is
counted nowhere), L = layers, d = attention width, r = LoRA rank; each term is one forward pass:
  vision tower + projector (pages only): 2 P_vit T_vit + 4 L_vit T_tile^2 d_vit per tile + the patch convolution,
  + 2 P_proj T_img;
  language model (queries and pages), LoRA left out: 2 P_lm T + 4 L_lm s^2 d_lm per sequence of length s;
  LoRA: 2 r (in + out) per token on each adapted projection of the language model (q, k, v, o, gate, up, down);
  heads: 2 H D T; the loss's MaxSim: 2 C Np Lq Lp D.
Model FLOPs (what the step needs, each forward once): vision + language model + LoRA + heads + loss forwards, and the
backward the gradients need. With LoRA: the language model's input gradients (2 P_lm T, plus 8 L_lm s^2 d_lm: the
attention matmuls have two activation inputs each; its frozen weights get none), LoRA's input and weight gradients
(twice its forward), the heads' (twice theirs), the loss's query gradients (2 C Np Lq D; the pages' are a
scatter-add), less what autograd skips: the first layer's q, k, v read the embeddings, which need no gradient.
Without LoRA nothing flows back through the backbone: the heads' weight gradients only. The vision tower is frozen:
forward only.
Executed FLOPs (what runs): model FLOPs plus the forwards run again. Gradient caching (several micro-batches)
encodes each micro-batch twice, phase 1 without a graph and phase 3 with it (language model, LoRA and heads again;
the vision tower once: train.py reuses phase 1's image features); gradient checkpointing recomputes the language
model's layers (with their LoRA) in backward. So cached + checkpointed executes the language model forward three
times. Plus the loss's page gradients, a scatter-add in model FLOPs, which colintern_model's MaxSim runs as a matmul
over one-hot choices (2 C Np Lq Lp D) for a fixed summation order. (torch stops each layer's recomputation at the
last tensor backward needs, before down_proj's LoRA B: 2 r d_lm per token a layer, counted here and not run.)
MFU = model FLOPs / step time / peak, HFU = executed FLOPs / step time / peak, each against two peaks: the
datasheet's (--peak_tflops, default 989 = H100 SXM dense bf16, H200 the same) and the measured one, the TFLOP/s of an
8192^3 bf16 matmul on the device, timed at start-up (CUDA only; on a CPU neither peak nor MFU is printed).
Goal (issue 24): 1B training at >= 35% MFU (model FLOPs over datasheet peak) in bf16 with 5-tile pages and 256
queries per step through gradient caching on one H100/H200; page encoding pages/s at 1B and 8B.

--contrastive mode: ONE model with LoRA (and --gradient_checkpointing if given) and one optimizer serve every
configuration: contrastive batch C as C/--micro micro-batches with gradient caching ("cached"), and each --plain C
as one batch without caching ("plain"). Each configuration runs --warmup optimizer steps of
colintern_loss.step_forward_backward + optimizer step at its own shapes (kernels, allocator, Adam's state), then times
--steps more. One line a configuration: median time per step, samples/s, peak memory and its growth over the memory
in use just before the step (CUDA: max_memory_allocated after a reset, over memory_allocated; CPU: peak RSS (VmHWM
reset) over RSS, with glibc's mmap threshold fixed at 128 KiB so that freed activations go back to the OS and RSS
follows the live tensors), that growth as a multiple of the smallest C's of the same kind (and, on a plain line, the
cached growth at that C as a multiple of the plain one). Then its FLOPs line, model (by part) and executed, and on
CUDA its MFU/HFU line.
With caching the growth should stay near one micro-batch's activations plus what the "expected" line prints for C:
the cached embeddings and their gradients, C x (Lq + (1 + num_negs) x Lp) x D x 4 bytes x 2, and the loss's
(C, Np, Lq) maxima, argmax indices and gradient weights plus its similarity blocks. Without caching it grows with C.
"""

import argparse
import copy
import ctypes
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import colintern_loss as cl  # noqa: E402
import make_tiny_model  # noqa: E402
import train  # noqa: E402
from colintern_loss import CPU_TRAIN_SIM_BLOCK, GPU_TRAIN_SIM_BLOCK  # noqa: E402
from colintern_model import QUANTIZE, ColIntern, ColInternProcessor, LoraSettings, load_backbone, resolve_dtype  # noqa: E402
from colintern_scoring import sync  # noqa: E402
from make_synthetic_data import render_keyword_page  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size",
        default="tiny",
        choices=sorted(make_tiny_model.SIZES),
        help="model shapes from make_tiny_model.py, random weights ('1b' = InternVL3.5-1B)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="backbone dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32")
    p.add_argument(
        "--batch_sizes",
        default=None,
        help="comma-separated queries per step (default 4,8,16 on CPU; 8,16,32,64 on CUDA)",
    )
    p.add_argument("--max_tiles", type=int, default=4, help="tiles per page, as train.py --max_tiles")
    p.add_argument(
        "--page_tiles",
        default="2x2",
        help="page size in tiles (COLSxROWS): 2x2 gives 4 tiles + 1 thumbnail at --max_tiles 4",
    )
    p.add_argument("--num_negs", type=int, default=0, help="hard negatives per query, as train.py --num_negs")
    p.add_argument("--lora_r", type=int, default=32, help="LoRA rank when LoRA is on")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (the median is printed)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first, per configuration, on its own batch (its shapes)"
    )
    g = p.add_argument_group("gradient caching (--contrastive mode)")
    g.add_argument(
        "--contrastive",
        default=None,
        help="comma-separated contrastive batches C (queries per loss), each measured as C/--micro "
        "micro-batches with gradient caching (train.py --batch_size MICRO --grad_accum C/MICRO); "
        "switches from the default sweep to this mode (LoRA on)",
    )
    g.add_argument("--micro", type=int, default=2, help="queries per micro-batch for --contrastive")
    g.add_argument(
        "--plain",
        default="",
        help="comma-separated batches measured as one plain batch, without caching, for comparison",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="--contrastive: checkpoint the language model's layers (train.py --gradient_checkpointing)",
    )
    g.add_argument(
        "--lora_dropout",
        type=float,
        default=0.0,
        help="--contrastive: LoRA dropout (the recipe's is 0.1; caching replays its masks)",
    )
    g.add_argument(
        "--optimizer",
        default="adamw",
        choices=train.OPTIMIZERS,
        help="--contrastive: optimizer, as train.py --optimizer (the 8-bit ones need bitsandbytes)",
    )
    g.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE,
        help="as train.py --quantize: the random backbone is saved to a temporary folder and loaded back "
        "through load_backbone with its language model in 8 or 4 bits (default %(default)s)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=989.0,
        help="accelerator peak for MFU, TFLOP/s (H100 SXM dense bf16: 989; H200 the same)",
    )
    args = p.parse_args(argv)
    if args.contrastive:
        if args.micro < 1:
            p.error(f"--micro must be >= 1, got {args.micro}")
        bad = [c for c in int_list(args.contrastive) if c % args.micro or c < 2 * args.micro]
        if bad:
            p.error(
                f"--contrastive {bad}: each C must be a multiple of --micro {args.micro} and at least two "
                f"micro-batches (one micro-batch is a plain step: list it in --plain)"
            )
    elif args.plain:
        p.error("--plain compares against --contrastive: pass --contrastive too")
    elif args.quantize != "none":
        p.error("--quantize is measured in --contrastive mode (the sweep copies its backbone per configuration)")
    return args


def int_list(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def peak_rss_reset() -> None:
    """Reset this process's peak RSS (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status: the CPU memory figures need Linux")


def libc():
    try:
        lib = ctypes.CDLL(None)
        return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def mmap_large_allocations() -> bool:
    """Fix glibc's mmap threshold at its starting 128 KiB (M_MMAP_THRESHOLD = -3). glibc otherwise raises it after
    each free of an mmapped block, up to 32 MiB, so that activations of one step stay in the heap after they are
    freed and RSS before the next step would count them. -> whether it worked (glibc)."""
    lib = libc()
    return bool(lib and lib.mallopt(-3, 128 * 1024))


def memory_now_mib(device) -> float:
    """Memory in use: CUDA allocated, or RSS after returning freed heap memory to the OS."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    lib = libc()
    if lib:
        lib.malloc_trim(0)
    return rss_mib()


def linear_params(module) -> int:
    """Weights of the linear layers, LoRA's adapters left out (counted apart), as in x out: a 4-bit layer's weight
    tensor holds packed bytes, not one element a weight."""
    return sum(
        m.in_features * m.out_features
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and ".lora_" not in name
    )


def vision_flops(model: ColIntern, inputs: dict) -> float:
    """Forward FLOPs of the vision tower + projector on one processed batch (none for queries)."""
    if "pixel_values" not in inputs:
        return 0.0
    cfg = model.backbone.config
    vis = cfg.vision_config
    pixel_values = inputs["pixel_values"]
    tiles = pixel_values.shape[0]
    patch = vis.patch_size[0] if isinstance(vis.patch_size, (list, tuple)) else vis.patch_size
    tile_tokens = (pixel_values.shape[-1] // patch) ** 2 + 1  # + class token
    conv = 3 * patch**2 * vis.hidden_size * (tile_tokens - 1)
    vision = tiles * (
        2 * linear_params(model.backbone.vision_tower) * tile_tokens
        + 2 * conv
        + 4 * vis.num_hidden_layers * tile_tokens**2 * vis.hidden_size
    )
    return vision + 2 * linear_params(model.backbone.multi_modal_projector) * tiles * cfg.image_seq_length


def language_model_flops(model: ColIntern, inputs: dict) -> tuple:
    """Forward FLOPs of the language model on one processed batch, LoRA left out -> (linear layers, attention, real
    tokens). Padding is counted nowhere: the sequences' real lengths."""
    txt = model.backbone.config.text_config
    p_lm = linear_params(model.backbone.language_model)
    d_attn = txt.num_attention_heads * txt.head_dim
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    attention = sum(4 * txt.num_hidden_layers * s**2 * d_attn for s in lengths)
    return 2.0 * p_lm * sum(lengths), float(attention), sum(lengths)


def forward_flops(model: ColIntern, inputs: dict) -> tuple:
    """Forward FLOPs of the backbone on one processed batch of queries or pages, LoRA left out (see the module
    docstring) -> (vision tower + projector FLOPs, language model FLOPs, real tokens)."""
    linear, attention, tokens = language_model_flops(model, inputs)
    return vision_flops(model, inputs), linear + attention, tokens


def lora_layers(model: ColIntern) -> list:
    """The language model's projections that carry LoRA adapters (peft LoraLayer), with their ranks."""
    from peft.tuners.lora import LoraLayer

    return [
        (m, [m.r[a] for a in m.lora_A]) for m in model.backbone.language_model.modules() if isinstance(m, LoraLayer)
    ]


def lora_flops_per_token(model: ColIntern) -> float:
    """LoRA's forward FLOPs per language-model token: 2 r (in + out) on each adapted projection (x A^T, then B)."""
    return float(sum(2 * r * (m.in_features + m.out_features) for m, ranks in lora_layers(model) for r in ranks))


def unneeded_input_grad_flops_per_token(model: ColIntern) -> tuple:
    """Backward FLOPs per token that autograd skips -> (base weights, LoRA): the first layer's q, k and v read the
    embeddings, which need no gradient (nothing trainable precedes them; checkpointing is non-reentrant and does not
    hook them to require one), so neither their base weight nor LoRA's A multiplies a gradient back to their input."""
    attention = model.backbone.language_model.layers[0].self_attn
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    ranks = {id(m): r for m, r in lora_layers(model)}
    base = sum(2 * m.in_features * m.out_features for m in projections)
    lora = sum(2 * r * m.in_features for m in projections for r in ranks.get(id(m), []))
    return float(base), float(lora)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """One optimizer step's FLOPs by part, each ONE forward pass over the step's batch (all micro-batches), plus
    what backward needs (see the module docstring)."""

    vision: float  # vision tower + projector, pages
    lm: float  # language model, queries and pages, LoRA left out: linear layers + attention
    attention: float  # attention's share of lm: its backward multiplies twice (both inputs are activations)
    lora: float  # LoRA adapters on the language model's projections
    heads: float  # query and page heads
    loss: float  # the loss's MaxSim similarities, 2 C Np Lq Lp D
    loss_backward: float  # its query gradients, 2 C Np Lq D (the pages' are a scatter-add of query tokens)
    loss_pages_backward: float  # the pages' gradients as run: a matmul over one-hot choices, 2 C Np Lq Lp D
    skipped: tuple  # (base, LoRA) input-gradient FLOPs backward skips in the first layer
    lora_on: bool  # whether anything is back-propagated through the language model


def step_flops(model: ColIntern, micro_batches: list) -> StepFlops:
    """The parts of one optimizer step over `micro_batches` (one plain batch, or gradient caching's several)."""
    vision = linear = attention = 0.0
    tokens = 0
    for inputs in [x for b in micro_batches for x in (b["queries"], b["pages"])]:
        vision += vision_flops(model, inputs)
        lm_linear, lm_attention, n = language_model_flops(model, inputs)
        linear, attention, tokens = linear + lm_linear, attention + lm_attention, tokens + n
    c = sum(b["n_queries"] for b in micro_batches)
    n_pages = sum(b["pages"]["input_ids"].shape[0] for b in micro_batches)
    lq = max(b["queries"]["input_ids"].shape[1] for b in micro_batches)  # the loss's padded lengths
    lp = max(b["pages"]["input_ids"].shape[1] for b in micro_batches)
    d = model.proj_dim
    skipped_base, skipped_lora = unneeded_input_grad_flops_per_token(model)
    return StepFlops(
        vision=vision,
        lm=linear + attention,
        attention=attention,
        lora=lora_flops_per_token(model) * tokens,
        heads=2.0 * model.hidden_size * d * tokens,
        loss=2.0 * c * n_pages * lq * lp * d,
        loss_backward=2.0 * c * n_pages * lq * d,
        loss_pages_backward=2.0 * c * n_pages * lq * lp * d,
        skipped=(skipped_base * tokens, skipped_lora * tokens),
        lora_on=model.lora is not None,
    )


def model_flops_parts(f: StepFlops) -> dict:
    """Model FLOPs of one step by part: every forward once, and the backward that the gradients need."""
    if not f.lora_on:  # nothing flows back through the backbone: the heads' weight gradients only
        return {
            "vision": f.vision,
            "language model": f.lm,
            "LoRA": 0.0,
            "heads": 2 * f.heads,
            "loss": f.loss + f.loss_backward,
        }
    return {
        "vision": f.vision,
        "language model": f.lm + (f.lm + f.attention - f.skipped[0]),  # input gradients only: weights frozen
        "LoRA": f.lora + (2 * f.lora - f.skipped[1]),  # input and weight gradients
        "heads": 3 * f.heads,
        "loss": f.loss + f.loss_backward,
    }


def model_flops(f: StepFlops) -> float:
    return sum(model_flops_parts(f).values())


def executed_flops(f: StepFlops, caching: bool, checkpointing: bool) -> float:
    """What runs: model FLOPs plus the forwards run again and the loss's page gradients as a matmul. Gradient
    caching encodes each micro-batch twice (without a graph, then with one), the vision tower once (train.py reuses
    its image features); checkpointing recomputes the language model's layers (LoRA in them) in backward."""
    again = (f.lm + f.lora + f.heads) * caching
    if checkpointing and f.lora_on:
        again += f.lm + f.lora
    return model_flops(f) + again + f.loss_pages_backward


def measured_matmul_peak(device, n=8192, reps=10) -> float:
    """TFLOP/s of an n x n x n bf16 matmul on `device`, the mean of `reps` after 3 warm-up ones: the peak this card
    reaches on what a transformer is made of, MFU's second denominator (random inputs: zeros draw less power)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    sync(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - start) / 1e12


def make_batches(processor, batch_size, num_negs, page_size, n=3):
    collate = train.Collate(processor)
    words = [f"page {i} about topic {i * 7 % 13}" for i in range(batch_size * (1 + num_negs) * n)]
    examples = [
        {
            "query": f"Which page is about topic {i}?",
            "pos": render_keyword_page(words[i], page_size),
            "negs": [render_keyword_page(words[i + batch_size * k * n], page_size) for k in range(1, num_negs + 1)],
        }
        for i in range(batch_size * n)
    ]
    t = time.perf_counter()
    batches = [collate(examples[i * batch_size : (i + 1) * batch_size]) for i in range(n)]
    collate_rate = batch_size * n / (time.perf_counter() - t)
    return batches, collate_rate


def run_config(backbone_fn, processor, batch, lora_r, lora, checkpointing, steps, warmup, device):
    """-> (samples/s, peak MiB, step seconds, model) for one configuration, on a fresh ColIntern."""
    torch.manual_seed(0)
    model = ColIntern(
        backbone_fn(),
        lora=LoraSettings(r=lora_r, alpha=lora_r, dropout=0.0) if lora else None,
        max_tiles=processor.max_tiles,
        **processor.pixel_normalisation(),
    )
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    encoder = cl.QueryPageEncoder(model)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    batch = to_device(batch, device)

    def step():
        cl.batch_loss(encoder, batch, cl.StepLoss(0.02)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_rss_reset()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    seconds = statistics.median(times)
    return batch["n_queries"] / seconds, peak, seconds, model


def expected_line(c: int, micro_batches: list, num_negs: int, dim: int, device) -> str:
    """What gradient caching must hold besides one micro-batch's activations, for contrastive batch c."""
    lq = max(b["queries"]["input_ids"].shape[1] for b in micro_batches)
    lp = max(b["pages"]["input_ids"].shape[1] for b in micro_batches)
    n_pages = c * (1 + num_negs)
    embeddings = c * (lq + (1 + num_negs) * lp) * dim * 4 * 2
    # the loss keeps each argmax in the smallest integer type that holds 0..Lp-1 (uint8, int16, int32)
    index_bytes = 1 if lp <= 2**8 else 2 if lp <= 2**15 else 4
    block = GPU_TRAIN_SIM_BLOCK if device.type == "cuda" else CPU_TRAIN_SIM_BLOCK
    loss = c * n_pages * lq * (4 + index_bytes + 4) + 2 * block * 4
    return (
        f"expected C {c}: embeddings (values + grads) {c} x (Lq {lq} + {1 + num_negs} x Lp {lp}) x D {dim} x "
        f"4 B x 2 = {embeddings / 2**20:.1f} MiB; loss ({c} x {n_pages} x {lq}) x (4 + {index_bytes} + 4) B "
        f"+ 2 blocks of {block} fp32 = {loss / 2**20:.1f} MiB; together {(embeddings + loss) / 2**20:.1f} MiB"
    )


def optimizer_step(encoder, optimizer, micro_batches) -> None:
    cl.step_forward_backward(encoder, micro_batches, cl.StepLoss(0.02))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_step(encoder, optimizer, micro_batches, warmup_steps, steps, device):
    """-> (median step seconds, peak MiB, MiB in use before the step) over `steps` optimizer steps, after
    `warmup_steps` untimed ones on the same micro-batches: kernels chosen for these shapes, the allocator's blocks
    sized for them, Adam's state made."""
    for _ in range(warmup_steps):
        optimizer_step(encoder, optimizer, micro_batches)
    before = memory_now_mib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        peak_rss_reset()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        optimizer_step(encoder, optimizer, micro_batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    return statistics.median(times), peak, before


def contrastive_sweep(args, backbone, processor, page_size, device, peaks):
    """Optimizer steps at each contrastive batch, cached (C/micro micro-batches) and plain (one batch)."""
    cached, plain = int_list(args.contrastive), int_list(args.plain)
    configs = sorted(
        [(c, args.micro, True) for c in cached] + [(c, c, False) for c in plain], key=lambda x: (x[0], not x[2])
    )  # by C, cached first: a cut run loses the largest C only
    torch.manual_seed(0)
    model = ColIntern(
        backbone,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_r, dropout=args.lora_dropout),
        max_tiles=processor.max_tiles,
        **processor.pixel_normalisation(),
    )
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    encoder = cl.QueryPageEncoder(model)
    optimizer = train.make_optimizer(args.optimizer, model.trainable_parameters(), 1e-4)
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    print(
        f"contrastive mode: LoRA r {args.lora_r} dropout {args.lora_dropout}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, optimizer {args.optimizer}, "
        f"{n_trainable / 1e6:.1f}M trainable parameters; per configuration {args.warmup} warm-up step(s) at its "
        f"shape, then {args.steps} timed step(s), median",
        flush=True,
    )
    kind = "GPU" if device.type == "cuda" else "RSS"
    smallest, growths, shown = {}, {}, set()
    for c, micro, caching in configs:
        micro_batches, _ = make_batches(processor, micro, args.num_negs, page_size, n=c // micro)
        micro_batches = [to_device(b, device) for b in micro_batches]
        if c not in shown:
            print(expected_line(c, micro_batches, args.num_negs, model.proj_dim, device), flush=True)
            shown.add(c)
        name = f"C {c:4d} micro {micro:3d} {'cached' if caching else 'plain '}"
        label = f"{name} ({len(micro_batches)} x {micro} queries)"
        fits = True
        try:
            seconds, peak, before = measure_step(encoder, optimizer, micro_batches, args.warmup, args.steps, device)
        except torch.cuda.OutOfMemoryError:
            fits = False  # leave the except block first, so the exception's frames (and tensors) are freed
        if not fits:
            optimizer.zero_grad(set_to_none=True)
            print(f"{label}: out of GPU memory", flush=True)
            del micro_batches
            gc.collect()
            torch.cuda.empty_cache()
            continue
        growth = peak - before
        growths[(c, caching)] = growth
        base_c, base_growth = smallest.setdefault(caching, (c, growth))
        line = (
            f"{label}: step {seconds:8.2f} s, {c / seconds:8.3g} samples/s, peak {kind} {peak:8.0f} MiB, "
            f"+{growth:7.0f} MiB over the {before:.0f} MiB before the step, growth "
            f"{ratio_text(growth, base_growth)} vs C {base_c} {'cached' if caching else 'plain'}"
        )
        if not caching and (c, True) in growths:
            line += f", {ratio_text(growths[(c, True)], growth)} with caching"
        print(line, flush=True)
        f = step_flops(model, micro_batches)
        for text in flops_lines(name, f, executed_flops(f, caching, args.gradient_checkpointing), seconds, peaks):
            print(text, flush=True)
        del micro_batches
        if device.type == "cuda":
            torch.cuda.empty_cache()


def flops_lines(name: str, f: StepFlops, executed: float, seconds: float, peaks: tuple) -> list:
    """The step's model and executed FLOPs; on CUDA, MFU and HFU against the datasheet and the measured peak
    (`peaks`: TFLOP/s, measured None on a CPU)."""
    model = model_flops(f)
    unit, scale = ("TFLOP", 1e12) if model >= 1e12 else ("GFLOP", 1e9)
    parts = ", ".join(f"{part} {x / scale:.4g}" for part, x in model_flops_parts(f).items())
    lines = [
        f"{name} FLOPs: model {model / scale:.4g} {unit} ({parts}), executed {executed / scale:.4g} {unit} "
        f"(x{executed / model:.2f})"
    ]
    datasheet, measured = peaks
    if measured is not None:
        m, e = model / seconds / 1e12, executed / seconds / 1e12
        lines.append(
            f"{name} MFU {m / datasheet:.1%} of datasheet {datasheet:.0f}, {m / measured:.1%} of measured "
            f"{measured:.0f} TFLOP/s (model {m:.1f} TFLOP/s); HFU {e / datasheet:.1%} of datasheet, "
            f"{e / measured:.1%} of measured (executed {e:.1f} TFLOP/s)"
        )
    return lines


def ratio_text(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b > 0 else "x n/a (no growth to compare with)"


def to_device(batch: dict, device) -> dict:
    return {
        "queries": {k: v.to(device) for k, v in batch["queries"].items()},
        "pages": {k: v.to(device) for k, v in batch["pages"].items()},
        "n_queries": batch["n_queries"],
    }


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, args.device, args.quantize)
    tile = 224 if args.size == "tiny" else 448
    pristine, hf_processor = make_tiny_model.build(args.size, tile=tile, seed=0)
    processor = ColInternProcessor(hf_processor, max_tiles=args.max_tiles)
    cols, rows = (int(x) for x in args.page_tiles.lower().split("x"))
    page_size = (cols * tile, rows * tile)
    if args.quantize == "none":
        pristine = pristine.to(device=device, dtype=dtype).requires_grad_(False).eval()
    else:  # bitsandbytes quantises while from_pretrained loads: through a save_pretrained folder, as train.py does
        with tempfile.TemporaryDirectory(prefix="colintern_bench_") as folder:
            pristine.to(dtype).save_pretrained(folder)
            hf_processor.save_pretrained(folder)
            del pristine
            pristine = load_backbone(folder, dtype=dtype, device_map=str(device), quantize=args.quantize)

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    where = f"{args.device} ({hardware})"
    memory = ""
    if device.type == "cpu" and args.contrastive:
        memory = (
            ", RSS follows live tensors (mmap threshold fixed)"
            if mmap_large_allocations()
            else ", glibc mallopt unavailable: freed memory may stay in RSS"
        )
    print(
        f"bench_train: size {args.size}, {where}, dtype {dtype}, quantize {args.quantize}, page "
        f"{page_size[0]}x{page_size[1]} px, max_tiles {args.max_tiles}, num_negs {args.num_negs}, {args.steps} "
        f"timed steps per config{memory}",
        flush=True,
    )
    if device.type == "cuda":
        peaks = (args.peak_tflops, measured_matmul_peak(device))
        torch.cuda.empty_cache()
        print(
            f"measured bf16 matmul peak {peaks[1]:.0f} TFLOP/s (8192 x 8192 x 8192, mean of 10 after 3 warm-up); "
            f"datasheet peak {args.peak_tflops:.0f} TFLOP/s (--peak_tflops)",
            flush=True,
        )
    else:
        peaks = (args.peak_tflops, None)
        print(f"measured bf16 matmul peak n/a on {device.type} (MFU and HFU are printed on CUDA only)", flush=True)
    if args.contrastive:
        return contrastive_sweep(args, pristine, processor, page_size, device, peaks)

    def backbone_fn():
        return copy.deepcopy(pristine)  # LoRA is injected into a fresh copy for each configuration

    sizes = int_list(args.batch_sizes or ("8,16,32,64" if device.type == "cuda" else "4,8,16"))
    for b in sizes:
        batches, collate_rate = make_batches(processor, b, args.num_negs, page_size, n=1)
        batch = batches[0]
        page_len, tiles = batch["pages"]["input_ids"].shape[1], batch["pages"]["pixel_values"].shape[0]
        print(
            f"batch {b}: {tiles} tiles, page length {page_len} tokens, query length "
            f"{batch['queries']['input_ids'].shape[1]}; collate (one DataLoader worker) {collate_rate:.1f} samples/s"
        )
        base = None
        for lora in (False, True):
            for checkpointing in (False, True):
                if checkpointing and not lora:
                    continue  # nothing flows back through the backbone without LoRA: checkpointing is a no-op
                label = f"batch {b:3d} lora {'on ' if lora else 'off'} ckpt {'on ' if checkpointing else 'off'}"
                try:
                    rate, peak, seconds, model = run_config(
                        backbone_fn, processor, batch, args.lora_r, lora, checkpointing, args.steps, args.warmup, device
                    )
                except torch.cuda.OutOfMemoryError:
                    print(f"{label}: out of GPU memory")
                    torch.cuda.empty_cache()
                    continue
                base = base or rate
                line = (
                    f"{label}: {rate:8.2f} samples/s, step {seconds * 1000:7.1f} ms, peak "
                    f"{'GPU' if device.type == 'cuda' else 'RSS'} {peak:8.0f} MiB, x{rate / base:.2f} vs "
                    f"heads-only"
                )
                print(line, flush=True)
                f = step_flops(model, [batch])
                for text in flops_lines(label.rstrip(), f, executed_flops(f, False, checkpointing), seconds, peaks):
                    print(text, flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main(parse_args())
