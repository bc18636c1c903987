r"""The 2026 training levers on synthetic data: held-out nDCG@5 of today's recipe against --batch_by source,
--bidirectional and --matryoshka_dims (scored at each prefix with --dim), over several seeds.

A setting below the demo's ceiling (the demo reaches 0.93-0.99 nDCG@5): epoch 1 only, few steps. The data's `source`
column is the page geometry, which does not make in-batch pages answer each other's queries (a topic would: every
page of a topic carries its title). Every run is the real command (train.py, then eval.py on the held-out pages).

    python bench/bench_levers.py                              # 3 seeds, 150 steps: ~15-20 min on 2 cores
    python bench/bench_levers.py --seeds 0 --steps 20         # a quick look
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

CONFIGS = {  # name -> extra train.py flags
    "today's recipe": [],
    "--batch_by source": ["--batch_by", "source"],
    "--bidirectional": ["--bidirectional"],
    "--matryoshka_dims 128,64,32": ["--matryoshka_dims", "128,64,32"],
}
MATRYOSHKA_DIMS = (128, 64, 32)


def run(*command, env=None) -> float:
    start = time.perf_counter()
    subprocess.run(
        [str(c) for c in command],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env={
            **os.environ,
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            **(env or {}),
        },
    )
    return time.perf_counter() - start


def ndcg_at_5(summary_path: str) -> float:
    with open(summary_path) as f:
        summary = json.load(f)
    return summary["benchmarks"]["local"]["average"]["ndcg_at_5"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out_dir",
        "--out",
        dest="out_dir",
        default=os.path.join(ROOT, "outputs", "bench_levers"),
        help="working folder",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each run (batch 8)")
    p.add_argument("--topics", type=int, default=50, help="synthetic topics (page titles)")
    p.add_argument("--train_pages", type=int, default=1600, help="synthetic training pages")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    model, data = os.path.join(args.out_dir, "tiny-internvl"), os.path.join(args.out_dir, "synthetic")
    if not os.path.isdir(model):
        run(PY, "make_tiny_model.py", "--out_dir", model)
    if not os.path.isdir(data):
        run(
            PY,
            "make_synthetic_data.py",
            "--out_dir",
            data,
            "--topics",
            args.topics,
            "--train_pages",
            args.train_pages,
            "--eval_pages",
            args.topics,
            "--seed",
            0,
            "--no_progress",
        )
    results, seconds = {}, {}
    for name, flags in CONFIGS.items():
        for seed in args.seeds:
            tag = f"{name.strip('-').split()[0]}-seed{seed}"
            out = os.path.join(args.out_dir, tag)
            ckpt = os.path.join(out, f"colintern_heads_step{args.steps}.pt")
            if not os.path.isfile(ckpt):
                seconds.setdefault(name, []).append(
                    run(
                        PY,
                        "train.py",
                        "--model_id",
                        model,
                        "--train_hub",
                        os.path.join(data, "train"),
                        "--out_dir",
                        out,
                        "--max_tiles",
                        4,
                        "--proj_dim",
                        128,
                        "--lora",
                        "--lora_r",
                        8,
                        "--lora_alpha",
                        16,
                        "--lora_dropout",
                        0.0,
                        "--optimizer",
                        "adamw",
                        "--batch_size",
                        8,
                        "--epochs",
                        1,
                        "--max_steps",
                        args.steps,
                        "--lr",
                        1e-3,
                        "--warmup_steps",
                        10,
                        "--temperature",
                        0.05,
                        "--save_every",
                        0,
                        "--num_workers",
                        1,
                        "--seed",
                        seed,
                        "--overwrite",
                        *flags,
                        env={"OMP_NUM_THREADS": "1"},
                    )
                )
            dims = MATRYOSHKA_DIMS if "--matryoshka_dims" in flags else (None,)
            for dim in dims:
                label = name if dim is None else f"{name} at --dim {dim}"
                summary = os.path.join(out, f"eval_dim{dim}.json")
                if not os.path.isfile(summary):
                    run(
                        PY,
                        "eval.py",
                        "--ckpt",
                        ckpt,
                        "--local_task",
                        os.path.join(data, "eval"),
                        "--device",
                        "cpu",
                        "--score_dtype",
                        "fp32",
                        "--results_dir",
                        os.path.join(args.out_dir, "mteb_cache"),
                        "--out",
                        summary,
                        *(["--dim", dim] if dim else []),
                    )
                results.setdefault(label, []).append(ndcg_at_5(summary))
                print(f"{label:40s} seed {seed}: nDCG@5 {results[label][-1]:.3f}", flush=True)
    print(
        f"\nheld-out nDCG@5 after {args.steps} steps (batch 8, {args.train_pages} pages, {args.topics} topics), "
        f"seeds {args.seeds}"
    )
    print(f"{'setting':42s} {'mean':>6s} {'sd':>6s}  per seed")
    for label, values in results.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{label:42s} {statistics.mean(values):6.3f} {sd:6.3f}  {' '.join(f'{v:.3f}' for v in values)}")
    for name, times in seconds.items():
        print(f"train time {name}: {statistics.mean(times):.0f} s a run")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "ndcg_at_5": results, "train_seconds": seconds}, f, indent=1)


if __name__ == "__main__":
    main()
