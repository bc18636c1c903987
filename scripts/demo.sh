#!/usr/bin/env bash
# The offline demo (`make demo`): the real workflow on a tiny random InternVL and synthetic pages, on CPU.
#   tiny model -> synthetic data -> eval untrained -> train epoch 1 -> mine -> train epoch 2 -> eval -> plots
# Every step is the same command a GPU user runs, with small sizes. Outputs: outputs/demo/ (override: OUT=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
TOPICS=${TOPICS:-50}         # topic keywords (page titles)
PAGES=${PAGES:-2000}         # training pages, PAGES/TOPICS per topic: epoch 1 at batch 8 is PAGES/8 optimizer steps
EVAL_PAGES=${EVAL_PAGES:-$TOPICS}  # held-out pages = queries, one per topic
# Training runs with one torch thread: the trainer and its data-loading worker then share 2 cores without
# oversubscription, which slows a step many times over on a busy machine. The other steps use all.
TRAIN_THREADS=${TRAIN_THREADS:-1}
export TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
run() { echo; echo "+ $*"; "$@"; }
start=$(date +%s)

run $PY make_tiny_model.py --out_dir "$OUT/tiny-internvl"
run $PY make_synthetic_data.py --out_dir "$OUT/synthetic" --topics "$TOPICS" --train_pages "$PAGES" \
    --eval_pages "$EVAL_PAGES" --seed 0 --no_progress

run $PY eval.py --model_id "$OUT/tiny-internvl" --local_task "$OUT/synthetic/eval" --device cpu \
    --score_dtype fp32 --results_dir "$OUT/mteb_cache" --out "$OUT/eval_untrained.json"

# lr 1e-3: higher rates can collapse the tiny model (every page scored alike, the loss stuck at ln(batch));
# docs/benchmarks.md has the seeds tried.
run env OMP_NUM_THREADS=$TRAIN_THREADS $PY train.py --model_id "$OUT/tiny-internvl" \
    --train_hub "$OUT/synthetic/train" --out_dir "$OUT/epoch1" \
    --max_tiles 4 --proj_dim 128 --lora --lora_r 8 --lora_alpha 16 --lora_dropout 0.0 --optimizer adamw \
    --batch_size 8 --epochs 1 --lr 1e-3 --warmup_steps 30 --temperature 0.05 \
    --save_every 100 --num_workers 1
run $PY eval.py --ckpt "$OUT/epoch1/colintern_heads_epoch1.pt" --local_task "$OUT/synthetic/eval" --device cpu \
    --score_dtype fp32 --results_dir "$OUT/mteb_cache" --out "$OUT/eval_epoch1.json"

run $PY mine_hard_negatives.py --ckpt "$OUT/epoch1/colintern_heads_epoch1.pt" --train_hub "$OUT/synthetic/train" \
    --split train --out "$OUT/hardnegs_epoch1.jsonl" --k 4 --search exact --device cpu --score_dtype fp32

run env OMP_NUM_THREADS=$TRAIN_THREADS $PY train.py --train_jsonl "$OUT/hardnegs_epoch1.jsonl" --resume_ckpt "$OUT/epoch1/colintern_heads_epoch1.pt" \
    --out_dir "$OUT/epoch2" --num_negs 1 --optimizer adamw --batch_size 8 --epochs 1 \
    --lr 5e-4 --warmup_steps 10 --temperature 0.05 --save_every 100 --num_workers 1
run $PY eval.py --ckpt "$OUT/epoch2/colintern_heads_epoch2.pt" --local_task "$OUT/synthetic/eval" --device cpu \
    --score_dtype fp32 --results_dir "$OUT/mteb_cache" --out "$OUT/eval_epoch2.json"

run $PY plot_training_loss.py --input "$OUT/epoch1/training_loss.txt" "$OUT/epoch2/training_loss.txt" \
    --out "$OUT/plots/training_loss.png" --smooth 20
run $PY plot_vidore_metrics.py --inputs "$OUT/eval_untrained.json" "$OUT/eval_epoch1.json" "$OUT/eval_epoch2.json" \
    --labels untrained epoch1 epoch2 --out_dir "$OUT/plots" --metrics ndcg_at_5 recall_at_1 mrr_at_10

$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
print(f"\nColIntern offline demo: held-out synthetic pages ({out}/synthetic/eval)")
print(f"{'model':<10} {'nDCG@5':>8} {'Recall@1':>9} {'MRR@10':>8}")
for name in ("untrained", "epoch1", "epoch2"):
    bench = json.load(open(f"{out}/eval_{name}.json"))["benchmarks"]
    avg = next(iter(bench.values()))["average"]
    print(f"{name:<10} {avg['ndcg_at_5']:>8.3f} {avg['recall_at_1']:>9.3f} {avg['mrr_at_10']:>8.3f}")

# Mining: every training page of a topic has the same title, so for a query the other pages of its topic are false
# negatives. The miner does not know topics; the margin filter has to catch them. The `answer` column (the topic)
# tells how well it did.
import collections, re, datasets
datasets.disable_progress_bars()
train = datasets.load_dataset("parquet", data_files=f"{out}/synthetic/train/data/*.parquet", split="train")
topic = train["answer"]
per_topic = collections.Counter(topic)
rows = [json.loads(line) for line in open(f"{out}/hardnegs_epoch1.jsonl")]
row_of = lambda path: int(re.search(r"doc_(\d+)\.png$", path).group(1))
kept = sum(topic[row_of(n)] == topic[row_of(r["pos"])] for r in rows for n in r["negs"])
negs = sum(len(r["negs"]) for r in rows)
stats = json.load(open(f"{out}/hardnegs_epoch1.stats.json"))
same = sum(per_topic[topic[row_of(r["pos"])]] - 1 for r in rows) / len(rows)
print(f"\nmining ({out}/hardnegs_epoch1.stats.json): positive rank under epoch 1 "
      f"R@1 {stats['positive_rank']['recall@1']:.3f}, R@10 {stats['positive_rank']['recall@10']:.3f} "
      f"(each query has {same:.0f} other pages with its title); the margin filter dropped "
      f"{stats['margin_dropped']['mean_per_query']:.1f} candidates per query; {kept} of {negs} negatives written "
      f"share the positive's topic; timings {stats['timings_s']}")
EOF
echo "demo finished in $(( $(date +%s) - start )) s; plots in $OUT/plots/"
