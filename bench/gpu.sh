#!/usr/bin/env bash
# Every GPU figure this repo produces, for a borrowed GPU machine (one H100/H200 class card, its own python3 with
# torch, transformers, peft, PIL; no network, no venv). A full run stops within 345 s (TOTAL_S, the package check
# included) plus a section's 10 s kill grace:
#
#     bash bench/gpu.sh              # from the repo root, every section; estimated 4-5 minutes on an H200 where
#                                    # (d), (e), (f) skip (no datasets/faiss, no bitsandbytes, one GPU): not yet run
#     bash bench/gpu.sh a c          # only the sections named: letters a-f, one per argument, any order
#     bash bench/gpu.sh --quick      # tiny model, CPU allowed, seconds: what tests/test_bench.py runs
#     bash bench/gpu.sh --quick b    # options and letters mix
#
# Sections, each under its own time limit (`timeout`, cut to what is left of TOTAL_S), each line of a bench prefixed
# with its letter; the estimates are for an H200, none measured yet:
#   (a) bench/bench_train.py --contrastive, limit 165 s (estimated 60-120 s, ~20 s of it building the model): optimizer
#       steps at InternVL3.5-1B shapes (random weights), bf16, pages of 2x2 tiles + thumbnail (--max_tiles 4), LoRA +
#       gradient checkpointing, micro-batch 16; contrastive batches 32 and 256 with gradient caching, 32 plain; at
#       each one a warm-up step at its shapes, then the median of 5 timed steps: samples/s, peak memory and its
#       growth, model and executed FLOPs (LoRA apart), MFU and HFU against the datasheet peak and a measured bf16
#       matmul peak
#   (b) bench/bench_maxsim.py --device cuda, limit 70 s (estimated 30-60 s): ColIntern's MaxSim against
#       colpali-engine, if a colpali-engine wheel is in $COLINTERN_BENCH_WHEELS (default .whl/; installed with pip
#       --no-deps --target into a temporary folder), else ColIntern's scorers alone
#   (c) bench/bench_mining.py --encode_only, limit 100 s (estimated 50-90 s): the page encoding of mining at 1B shapes,
#       256 pages: processing, model pages/s and MFU, ColIntern.encode_pages pages/s
#   (d) bench/bench_mining.py end to end (mine_hard_negatives.py, exact and FAISS), limit 150 s: only if datasets and
#       faiss import and time is left
#   (e) bench/bench_train.py --contrastive --quantize 4bit, limit 330 s: one optimizer step at InternVL3.5-8B shapes
#       (random weights), language model 4-bit NF4 (vision tower bf16), LoRA + checkpointing, micro-batch 32: step
#       time and peak memory. Full mode only, if bitsandbytes imports and time is left (building and saving the
#       random 8B backbone takes a few minutes of CPU: run it alone, `bash bench/gpu.sh e`)
#   (f) bench/bench_mining.py on 1 GPU vs 8 (torchrun), limit 240 s: only where 8 GPUs are present
# A section not named on the command line is "not selected" in the closing summary; one whose package is missing is
# skipped with a line that names it; one that fails or runs out of time says so and the next one runs. The exit
# status is 0 only if no section failed; 2 for an unknown argument or section letter.
#
# Environment:
#   PYTHON                    interpreter (default python3)
#   COLINTERN_BENCH_QUICK=1   same as --quick
#   COLINTERN_BENCH_MISSING   comma-separated modules to treat as not installed (e.g. "bitsandbytes,datasets,faiss,
#                             mteb"): the package check reports them missing, and every bench runs with them made
#                             unimportable, so a module-level import of one of them fails there as on the GPU machine
#   COLINTERN_BENCH_WHEELS    folder with peer wheels for (b) (default .whl)
#   COLINTERN_BENCH_LOGS      folder for each section's full stdout/stderr (default $OUT/bench_logs if $OUT is set,
#                             else a temporary folder)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

QUICK="${COLINTERN_BENCH_QUICK:-0}"
SELECTED=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        a|b|c|d|e|f) SELECTED+="$arg" ;;
        -*) echo "gpu.sh: unknown option $arg (options: --quick, --help)" >&2; exit 2 ;;
        *) echo "gpu.sh: unknown section '$arg': sections are the letters a b c d e f, one per argument" \
                "(e.g. bash bench/gpu.sh a c)" >&2; exit 2 ;;
    esac
done
SELECTED="${SELECTED:-abcdef}"
selected() { [[ "$SELECTED" == *"$1"* ]]; }
PY="${PYTHON:-python3}"
WHEELS="${COLINTERN_BENCH_WHEELS:-.whl}"
LOGS="${COLINTERN_BENCH_LOGS:-${OUT:+$OUT/bench_logs}}"
LOGS="${LOGS:-$(mktemp -d -t colintern_bench_logs.XXXXXX)}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
TOTAL_S=345  # every section together, the package check included: under 6 minutes
QUICK_S=240  # each section in --quick mode (python start-up dominates; a busy 2-core CPU is several times slower)
[[ "$QUICK" == 1 ]] && TOTAL_S=$((4 * QUICK_S))
START=$SECONDS

# Runs a bench script as __main__ with the COLINTERN_BENCH_MISSING modules made unimportable (sys.modules[m] = None
# makes `import m` raise ImportError and find_spec return None, as for a package that is not installed).
RUN_PY='import os, runpy, sys
for m in filter(None, (x.strip() for x in os.environ.get("COLINTERN_BENCH_MISSING", "").split(","))):
    sys.modules[m] = None
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")'

# --- packages, checked up front by importing them
CHECK_PY='import importlib, os, platform, sys
missing = set(filter(None, (x.strip() for x in os.environ.get("COLINTERN_BENCH_MISSING", "").split(","))))
for m in missing:
    sys.modules[m] = None
required, optional = sys.argv[1].split(","), sys.argv[2].split(",")
absent = []
for name in required + optional:
    try:
        version = getattr(importlib.import_module(name), "__version__", "present")
        print(f"package {name}: {version}")
    except Exception as e:  # a broken install counts as missing, with its error
        why = "treated as missing (COLINTERN_BENCH_MISSING)" if name in missing else f"{type(e).__name__}: {e}"
        print(f"package {name}: MISSING ({why})")
        absent.append(name)
if "torch" not in absent:
    import torch
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}, "
          f"{torch.get_num_threads()} CPU threads")
    print("DEVICE=" + ("cuda" if cuda else "cpu"))
print("ABSENT=" + ",".join(absent))'
check_out="$("$PY" -c "$CHECK_PY" torch,transformers,peft,PIL,tokenizers,tqdm,numpy bitsandbytes,datasets,faiss 2>&1)"
echo "$check_out" | grep -v -e '^ABSENT=' -e '^DEVICE='
ABSENT=",$(echo "$check_out" | sed -n 's/^ABSENT=//p'),"
DEVICE="$(echo "$check_out" | sed -n 's/^DEVICE=//p')"
for m in torch transformers peft PIL tokenizers tqdm numpy; do
    if [[ "$ABSENT" == *",$m,"* ]]; then
        echo "gpu.sh: required package $m is missing: nothing can run" >&2
        exit 2
    fi
done
has() { [[ "$ABSENT" != *",$1,"* ]]; }
if [[ -z "$DEVICE" ]]; then
    echo "gpu.sh: the package check did not run to the end with $PY (output above)" >&2
    exit 2
fi

if [[ "$QUICK" != 1 && "$DEVICE" != cuda ]]; then
    echo "gpu.sh: no CUDA device; on a CPU run bash bench/gpu.sh --quick (tiny model)" >&2
    exit 2
fi
MODE="$([[ "$QUICK" == 1 ]] && echo "quick (tiny model)" || echo full)"
echo "mode $MODE, sections $(echo "$SELECTED" | sed 's/./& /g; s/ $//'), device $DEVICE, logs in $LOGS"

declare -A STATUS
for tag in a b c d e f; do
    selected "$tag" || STATUS[$tag]="not selected"
done
FAILED=0

# section LETTER BUDGET_S TITLE SCRIPT ARGS...: runs one bench under min(BUDGET_S, time left of TOTAL_S)
section() {
    local tag="$1" budget="$2" title="$3"
    shift 3
    local left=$((TOTAL_S - (SECONDS - START)))
    ((budget > left)) && budget=$left
    if ((budget < 20)); then
        echo "skip: ($tag) $title: no time left of the ${TOTAL_S} s total"
        STATUS[$tag]="skipped (time)"
        return
    fi
    echo "== ($tag) $title (limit ${budget} s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$budget" "$PY" -c "$RUN_PY" "$@" 2>"$LOGS/$tag.err" \
        | tee "$LOGS/$tag.out" | sed -u "s/^/[$tag] /"
    local rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        STATUS[$tag]="ok in $((SECONDS - t0)) s"
    elif ((rc == 124 || rc == 137)); then
        STATUS[$tag]="TIMED OUT after ${budget} s (its lines above are what finished)"
        FAILED=1
    else
        STATUS[$tag]="FAILED (exit $rc, stderr in $LOGS/$tag.err)"
        tail -n 15 "$LOGS/$tag.err" | sed "s/^/[$tag stderr] /"
        FAILED=1
    fi
    echo "== ($tag) ${STATUS[$tag]}"
}

# --- (a) training steps with gradient caching
OPTIMIZER=paged_adamw_8bit
if selected a && ! has bitsandbytes; then
    OPTIMIZER=adamw
    echo "skip: the recipe's optimizer paged_adamw_8bit (bitsandbytes missing): (a) uses torch AdamW (LoRA's" \
         "optimizer state is ~0.2 GB either way)"
fi
if selected a; then
    if [[ "$QUICK" == 1 ]]; then
        section a "$QUICK_S" "training steps, gradient caching vs plain (tiny model)" bench/bench_train.py \
            --size tiny --device "$DEVICE" --threads 1 --max_tiles 1 --page_tiles 1x1 --contrastive 4,8 --micro 2 \
            --plain 4 --steps 2 --warmup 1 --gradient_checkpointing --lora_dropout 0.1 --optimizer "$OPTIMIZER"
    else
        section a 165 "training steps at 1B shapes, bf16, 5 tiles/page, LoRA + checkpointing, caching vs plain" \
            bench/bench_train.py --size 1b --device cuda --dtype bf16 --max_tiles 4 --page_tiles 2x2 \
            --contrastive 32,256 --micro 16 --plain 32 --steps 5 --warmup 1 --gradient_checkpointing \
            --lora_dropout 0.1 --optimizer "$OPTIMIZER"
    fi
fi

# --- (b) MaxSim scorer, with colpali-engine if its wheel was carried
if selected b; then
    PEERS=""
    wheel="$(ls "$WHEELS"/colpali_engine-*.whl 2>/dev/null | sort -V | tail -n 1)"
    if [[ -n "$wheel" ]]; then
        PEERS="$(mktemp -d -t colintern_bench_peers.XXXXXX)"
        if "$PY" -m pip install --quiet --no-deps --no-index --target "$PEERS" "$wheel" >"$LOGS/pip.log" 2>&1; then
            echo "colpali-engine peer: installed $(basename "$wheel") into $PEERS (--no-deps)"
        else
            echo "skip: colpali-engine peer wheel: pip could not install $wheel ($(tail -n 1 "$LOGS/pip.log"))"
            PEERS=""
        fi
    else
        echo "skip: colpali-engine peer wheel (no colpali_engine-*.whl in $WHEELS/; carry one from" \
             "\`pip download --no-deps colpali-engine==0.3.18 -d .whl\`): (b) compares against colpali-engine" \
             "only if this python has it"
    fi
    SAVED_PYTHONPATH="${PYTHONPATH-}"
    [[ -n "$PEERS" ]] && export PYTHONPATH="$PEERS${PYTHONPATH:+:$PYTHONPATH}"
    if [[ "$QUICK" == 1 ]]; then
        section b "$QUICK_S" "MaxSim scorers (small)" bench/bench_maxsim.py --device "$DEVICE" --threads 1 \
            --queries 8 --pages 80 --page_tokens 64 128 --repeats 1 --check_queries 8
    else
        section b 70 "MaxSim scorers on the GPU" bench/bench_maxsim.py --device cuda --queries 1024 --pages 2000 \
            --repeats 3
    fi
    if [[ -n "$PEERS" ]]; then
        rm -rf "$PEERS"
        if [[ -n "$SAVED_PYTHONPATH" ]]; then export PYTHONPATH="$SAVED_PYTHONPATH"; else unset PYTHONPATH; fi
    fi
fi

# --- (c) page encoding of mining
if ! selected c; then
    :
elif [[ "$QUICK" == 1 ]]; then
    section c "$QUICK_S" "page encoding of mining (tiny model)" bench/bench_mining.py --encode_only --size tiny \
        --device "$DEVICE" --threads 1 --pages 8 --doc_batch 4
else
    section c 100 "page encoding of mining at 1B shapes, 5 tiles/page" bench/bench_mining.py --encode_only \
        --size 1b --device cuda --pages 256 --page_size 896 896 --max_tiles 4 --doc_batch 32
fi

# --- (d) mining end to end (needs datasets for the page dataset and faiss for --search faiss)
if selected d; then
    need=()
    has datasets || need+=(datasets)
    has faiss || need+=(faiss)
    if ((${#need[@]})); then
        echo "skip: (d) mining end to end through mine_hard_negatives.py (needs ${need[*]}, missing)"
        STATUS[d]="skipped (${need[*]} missing)"
    elif [[ "$QUICK" == 1 ]]; then
        section d "$QUICK_S" "mining end to end (tiny model)" bench/bench_mining.py --size tiny --threads 1 \
            --pages 64 --planted_queries 8 --num_workers 0 --device "$DEVICE"
    else
        section d 150 "mining end to end at 1B shapes" bench/bench_mining.py --size 1b --device cuda --pages 1000 \
            --page_size 896 896 --max_tiles 4 --doc_batch 32
    fi
fi

# --- (e) a 4-bit 8B training step
if ! selected e; then
    :
elif [[ "$QUICK" == 1 ]]; then
    echo "skip: (e) 4-bit training step at 8B shapes (full mode only: it needs a GPU)"
    STATUS[e]="skipped (quick mode)"
elif ! has bitsandbytes; then
    echo "skip: (e) 4-bit training step at 8B shapes (needs bitsandbytes, missing)"
    STATUS[e]="skipped (bitsandbytes missing)"
else
    section e 330 "one training step at 8B shapes, language model 4-bit NF4, LoRA + checkpointing" \
        bench/bench_train.py --size 8b --device cuda --quantize 4bit --max_tiles 4 --page_tiles 2x2 \
        --contrastive 64 --micro 32 --steps 1 --warmup 1 --gradient_checkpointing --optimizer "$OPTIMIZER"
fi

# --- (f) mining end to end on 1 GPU vs 8 (torchrun): only where 8 GPUs are present
if selected f; then
    NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)"
    if [[ "$QUICK" == 1 || "$NGPU" -lt 8 ]]; then
        echo "skip: (f) mining on 1 vs 8 GPUs under torchrun (full mode with 8 GPUs only; $NGPU here)"
        STATUS[f]="skipped (needs 8 GPUs)"
    else
        section f 240 "mining end to end at 1B shapes on 1 GPU vs 8 (torchrun)" bench/bench_mining.py --size 1b \
            --device cuda --pages 2000 --page_size 896 896 --max_tiles 4 --doc_batch 32 --nproc 1 8
    fi
fi

summary="gpu.sh: done in $((SECONDS - START)) s:"
for tag in a b c d e f; do
    summary+=" ($tag) ${STATUS[$tag]};"
done
echo "${summary%;}"
exit $FAILED
