"""Training throughput and peak memory of train.py's step (forward, InfoNCE over MaxSim, backward, AdamW).

    python bench/bench_train.py                                   # tiny model on CPU (seconds)
    python bench/bench_train.py --size 1b --device cuda           # InternVL3.5-1B shapes, random weights, on a GPU
    python bench/bench_train.py --size 1b --device cuda --batch_sizes 8,16,32,64 --max_tiles 4

Sweeps batch size x gradient checkpointing {off, on} x LoRA {off, on} and prints one line per configuration:
samples/s (queries per second, each with its positive page; collation excluded, as DataLoader workers do it in
parallel), peak memory (CUDA: max_memory_allocated; CPU: peak RSS of this process, VmHWM, reset before each
configuration), model FLOPs utilisation on CUDA, and the ratio to heads-only without checkpointing at that batch.
Also prints how many samples/s one DataLoader worker collates (decode is free here: pages are in memory).

Model FLOPs per step (what the model needs, not what the hardware runs: recomputation from checkpointing is not
counted), with P = parameters in the linear layers of a tower, T = its tokens, L = layers, d = attention width:
  vision tower + projector (forward only; frozen, nothing flows back into it): 2 P_vit T_vit + 4 L_vit T_tile^2 d_vit
  per tile, + 2 P_proj T_img;
  language model forward, for queries and pages: 2 P_lm T + 4 L_lm s^2 d_lm per sequence of length s;
  with LoRA the backward pass computes input gradients through the language model: the same again (LoRA's own
  weight gradients are negligible); without LoRA nothing is back-propagated through the backbone; heads: 6 H D T.
MFU = model FLOPs / step time / peak (--peak_tflops, default 989 = H100 SXM dense bf16).
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import make_tiny_model  # noqa: E402
import train  # noqa: E402
from colintern_model import ColIntern, ColInternProcessor, LoraSettings, resolve_dtype  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(make_tiny_model.SIZES),
                   help="model shapes from make_tiny_model.py, random weights ('1b' = InternVL3.5-1B)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="backbone dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32")
    p.add_argument("--batch_sizes", default=None,
                   help="comma-separated queries per step (default 4,8,16 on CPU; 8,16,32,64 on CUDA)")
    p.add_argument("--max_tiles", type=int, default=4, help="tiles per page, as train.py --max_tiles")
    p.add_argument("--page_tiles", default="2x2",
                   help="page size in tiles (COLSxROWS): 2x2 gives 4 tiles + 1 thumbnail at --max_tiles 4")
    p.add_argument("--num_negs", type=int, default=0, help="hard negatives per query, as train.py --num_negs")
    p.add_argument("--lora_r", type=int, default=32, help="LoRA rank when LoRA is on")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="accelerator peak for MFU, TFLOP/s (H100 SXM dense bf16: 989; H200 the same)")
    return p.parse_args(argv)


def keyword_page(word: str, size) -> Image.Image:
    page = Image.new("RGB", size, "white")
    ImageDraw.Draw(page).text((28, 28), word, fill="black", font=ImageFont.load_default(size=40))
    return page


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


def linear_params(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def model_flops(model: ColIntern, batch: dict, lora: bool) -> float:
    """Model FLOPs of one training step on `batch` (see the module docstring)."""
    cfg = model.backbone.config
    vis, txt = cfg.vision_config, cfg.text_config
    pixel_values = batch["pages"]["pixel_values"]
    tiles = pixel_values.shape[0]
    patch = vis.patch_size[0] if isinstance(vis.patch_size, (list, tuple)) else vis.patch_size
    tile_tokens = (pixel_values.shape[-1] // patch) ** 2 + 1  # + class token
    conv = 3 * patch ** 2 * vis.hidden_size * (tile_tokens - 1)
    vision = tiles * (2 * linear_params(model.backbone.vision_tower) * tile_tokens + 2 * conv
                      + 4 * vis.num_hidden_layers * tile_tokens ** 2 * vis.hidden_size)
    vision += 2 * linear_params(model.backbone.multi_modal_projector) * tiles * cfg.image_seq_length
    p_lm = linear_params(model.backbone.language_model)
    d_attn = txt.num_attention_heads * txt.head_dim
    lm, tokens = 0.0, 0
    for part in ("queries", "pages"):
        for s in batch[part]["attention_mask"].sum(dim=1).tolist():  # real tokens per sequence
            lm += 2 * p_lm * s + 4 * txt.num_hidden_layers * s ** 2 * d_attn
            tokens += s
    heads = 6 * model.hidden_size * model.proj_dim * tokens
    return vision + lm * (2 if lora else 1) + heads


def make_batches(processor, batch_size, num_negs, page_size, n=3):
    collate = train.Collate(processor)
    words = [f"page {i} about topic {i * 7 % 13}" for i in range(batch_size * (1 + num_negs) * n)]
    examples = [{"query": f"Which page is about topic {i}?", "pos": keyword_page(words[i], page_size),
                 "negs": [keyword_page(words[i + batch_size * k * n], page_size) for k in range(1, num_negs + 1)]}
                for i in range(batch_size * n)]
    t = time.perf_counter()
    batches = [collate(examples[i * batch_size:(i + 1) * batch_size]) for i in range(n)]
    collate_rate = batch_size * n / (time.perf_counter() - t)
    return batches, collate_rate


def run_config(backbone_fn, processor, batch, lora_r, lora, checkpointing, steps, device):
    """-> (samples/s, peak MiB, step seconds, model) for one configuration, on a fresh ColIntern."""
    torch.manual_seed(0)
    model = ColIntern(backbone_fn(), lora=LoraSettings(r=lora_r, alpha=lora_r, dropout=0.0) if lora else None,
                      max_tiles=processor.max_tiles, **processor.pixel_normalisation())
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    encoder = train.QueryPageEncoder(model)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    batch = {"queries": {k: v.to(device) for k, v in batch["queries"].items()},
             "pages": {k: v.to(device) for k, v in batch["pages"].items()}, "n_queries": batch["n_queries"]}

    def step():
        train.batch_loss(encoder, batch, 0.02).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
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
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else peak_rss_mib()
    seconds = statistics.median(times)
    return batch["n_queries"] / seconds, peak, seconds, model


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, args.device)
    sizes = [int(b) for b in (args.batch_sizes or ("8,16,32,64" if device.type == "cuda" else "4,8,16")).split(",")]
    tile = 224 if args.size == "tiny" else 448
    _, hf_processor = make_tiny_model.build(args.size, tile=tile, seed=0)
    processor = ColInternProcessor(hf_processor, max_tiles=args.max_tiles)
    cols, rows = (int(x) for x in args.page_tiles.lower().split("x"))
    page_size = (cols * tile, rows * tile)

    pristine, _ = make_tiny_model.build(args.size, tile=tile, seed=0)
    pristine = pristine.to(device=device, dtype=dtype).requires_grad_(False).eval()

    def backbone_fn():
        return copy.deepcopy(pristine)  # LoRA is injected into a fresh copy for each configuration

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    where = f"{args.device} ({hardware})"
    print(f"bench_train: size {args.size}, {where}, dtype {dtype}, page {page_size[0]}x{page_size[1]} px, "
          f"max_tiles {args.max_tiles}, num_negs {args.num_negs}, {args.steps} timed steps per config")
    for b in sizes:
        batches, collate_rate = make_batches(processor, b, args.num_negs, page_size, n=1)
        batch = batches[0]
        page_len, tiles = batch["pages"]["input_ids"].shape[1], batch["pages"]["pixel_values"].shape[0]
        print(f"batch {b}: {tiles} tiles, page length {page_len} tokens, query length "
              f"{batch['queries']['input_ids'].shape[1]}; collate (one DataLoader worker) {collate_rate:.1f} samples/s")
        base = None
        for lora in (False, True):
            for checkpointing in (False, True):
                if checkpointing and not lora:
                    continue  # nothing flows back through the backbone without LoRA: checkpointing is a no-op
                label = f"batch {b:3d} lora {'on ' if lora else 'off'} ckpt {'on ' if checkpointing else 'off'}"
                try:
                    rate, peak, seconds, model = run_config(backbone_fn, processor, batch, args.lora_r, lora,
                                                            checkpointing, args.steps, device)
                except torch.cuda.OutOfMemoryError:
                    print(f"{label}: out of GPU memory")
                    torch.cuda.empty_cache()
                    continue
                base = base or rate
                line = (f"{label}: {rate:8.2f} samples/s, step {seconds * 1000:7.1f} ms, peak "
                        f"{'GPU' if device.type == 'cuda' else 'RSS'} {peak:8.0f} MiB, x{rate / base:.2f} vs "
                        f"heads-only")
                if device.type == "cuda":
                    flops = model_flops(model, batch, lora)
                    achieved = flops / seconds
                    line += f", {achieved / 1e12:6.1f} TFLOP/s, MFU {achieved / (args.peak_tflops * 1e12):.1%}"
                print(line, flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main(parse_args())
