#!/usr/bin/env bash
# One GPU slice of issue 17, in MINUTES of wall time at most (eval/README.md, "GPU slices"):
#   1. the H200 speed table (fastdiff bench speed, capped at SPEED_SECONDS) when eval/results/speed-nvidia-h200.json
#      is missing, or when it is stale (fastdiff/ changed since, or a slice cut it short: no training or no
#      sampling rows) and re-measuring costs no quality row this slice (SPEED=always re-measures a stale table
#      regardless, SPEED=never skips it). The content hash of fastdiff/ is
#      kept beside the table in speed-nvidia-h200.source: the GPU machine receives files, not the git history;
#   2. eval/fmnist_quality.py --next with the minutes left: the first missing rows of the Fashion-MNIST table.
# Logs and results land in $OUT/round/ (at most 7 files: the device tool returns 8 files, 2 folders down):
#   round.log, fmnist.json, fmnist.md, fmnist-extras.tar.gz (new grids and logs), speed-*.{json,md,source}.
#
#   bash eval/gpu_round.sh MINUTES             on the GPU machine, after the kit's unpack.sh (FASTDIFF_COMMIT=<sha>
#                                              names the commit: the checkout there has no .git)
#   bash eval/gpu_round.sh --pack-args MINUTES here: the ../shared/device/pack.py arguments this slice needs
#   bash eval/gpu_round.sh --pack MINUTES      here: run pack.py with those arguments (into .gpu/)
#   bash eval/gpu_round.sh --collect FOLDER    here: take a slice's results (the returned round/ folder) into
#                                              eval/results
set -uo pipefail
cd "$(dirname "$0")/.."
SLUG=${SPEED_SLUG:-nvidia-h200}          # fastdiff bench speed names its files after the device
SPEED=${SPEED:-auto}                     # auto | always | never (for a stale table; a missing one is always made)
SPEED_SECONDS=${SPEED_SECONDS:-150}      # issue 17 wants the speed table in 2 minutes; 30 s for start-up
TEACHERS=${TEACHERS:-/tmp/kit/teachers}  # where the kit's unpack.sh puts the teacher folders
FMNIST_ARGS=${FMNIST_ARGS:-}             # extra fmnist_quality.py arguments (a CPU dry run: --num 4 ...)
MEMORY_SECONDS=${MEMORY_SECONDS:-300}    # MEMORY_ROW=1: eval/memory.py --sd15-gpu first, at most this long (issue 19;
                                         # with SPEED=never, so round/ stays within the 8 files that come back)
MEMORY_ARGS=${MEMORY_ARGS:-}             # extra eval/memory.py arguments (a CPU dry run: --width 0.05 --latent 8 ...)
RESERVE_SECONDS=30                       # copying and packing the results at the end
PY=${PYTHON:-python3}
WORK=${ROUND_WORK:-/tmp/round}           # runs, cached reference statistics, the working copy of the table

fastdiff_sha() {
  find fastdiff -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
    sha256sum | cut -c1-16
}
minutes() { awk "BEGIN { printf \"%.2f\", $1 / 60 }"; }
rows_fitting() {  # how many quality rows --next would run in $1 seconds
  $PY eval/fmnist_quality.py --next --budget-minutes "$(minutes "$1")" --work "$WORK/work" --plan $FMNIST_ARGS |
    grep -c ' run$'
}
speed_complete() {  # the committed table has training and sampling rows (a slice cut it short: not complete)
  $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); sys.exit(0 if r["training"] and r["sampling"] else 1)' \
    "eval/results/speed-$SLUG.json" 2>/dev/null
}
speed_due() {  # $1: seconds of the whole slice
  [ -f "eval/results/speed-$SLUG.json" ] || return 0
  # fresh and complete: not due; stale or incomplete: due where it costs no quality row
  speed_complete && [ "$(cat "eval/results/speed-$SLUG.source" 2>/dev/null)" = "$(fastdiff_sha)" ] && return 1
  case $SPEED in
    always) return 0 ;;
    never) return 1 ;;
  esac
  [ "$(rows_fitting $(($1 - RESERVE_SECONDS - SPEED_SECONDS)))" -ge "$(rows_fitting $(($1 - RESERVE_SECONDS)))" ]
}

if [ "${1:-}" = --pack-args ]; then
  seconds=$(awk "BEGIN { print int(${2:?minutes} * 60) - $RESERVE_SECONDS }")
  if speed_due "$((seconds + RESERVE_SECONDS))"; then
    printf -- '--xformers '  # the speed table compares xformers with SDPA
    seconds=$((seconds - SPEED_SECONDS))
  fi
  for t in $($PY eval/fmnist_quality.py --next --budget-minutes "$(minutes "$seconds")" --work "$WORK/work" \
             --teachers-needed $FMNIST_ARGS); do
    printf -- '--teacher ../shared/teachers/%s ' "$t"
  done
  echo
  exit 0
fi

if [ "${1:-}" = --pack ]; then
  # pack.py (../shared, read-only) imports fastdiff.inception, which lives at fastdiff.evaluation.inception now
  # shellcheck disable=SC2046
  exec $PY -c 'import runpy, sys, fastdiff.evaluation.inception as m
sys.modules["fastdiff.inception"] = m
sys.argv = ["pack.py"] + sys.argv[1:]
runpy.run_path("../shared/device/pack.py", run_name="__main__")' $(bash "$0" --pack-args "${2:?minutes}")
fi

if [ "${1:-}" = --collect ]; then
  from=${2:?the returned round/ folder}
  mkdir -p eval/results/fmnist/logs
  cp "$from"/fmnist.json "$from"/fmnist.md eval/results/fmnist/ &&
    tar -xzf "$from"/fmnist-extras.tar.gz -C eval/results/fmnist || exit 1
  # without torch 2.11's dynamo warning about diffusers' lru_cache-wrapped is_torch_version (harmless, and repeated
  # by every compiled row: it buried slice 1's log)
  grep -v -e 'Dynamo detected a call to a `functools.lru_cache`' -e '^This call originates from:' \
    -e 'diffusers/models/upsampling.py' -e 'is_torch_version("<", "2.1")' -e 'torch._dynamo.utils.warn_once' \
    "$from"/round.log | cat -s > eval/results/fmnist/logs/last-round.log
  for f in "$from"/speed-*; do [ -f "$f" ] && cp "$f" eval/results/; done
  $PY eval/fmnist_quality.py --render >/dev/null || exit 1  # fmnist.png: the GPU machine has no matplotlib
  if [ -f "$from/memory.json" ]; then  # MEMORY_ROW=1 slices
    mkdir -p eval/results/memory-sd15-h200
    cp "$from/memory.json" eval/results/memory-sd15-h200/results.json
    cp "$from/memory.md" eval/results/memory-sd15-h200/table.md
  fi
  echo "collected $from into eval/results/ (git status eval/results shows what changed)"
  exit 0
fi

MINUTES=${1:?usage: bash eval/gpu_round.sh MINUTES | --pack-args MINUTES | --pack MINUTES | --collect FOLDER}
# The checkout there is not installed in place: its fastdiff/ (first on sys.path for `python -m fastdiff` and the
# eval scripts) lacks the pipelines/ that pyproject installs as fastdiff.pipelines (the first slice failed on it).
[ -e fastdiff/pipelines ] || ln -s ../pipelines fastdiff/pipelines
# and the scripts under eval/ that do not put the root on sys.path themselves (memory.py) import it from here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
DEADLINE=$(awk "BEGIN { print int($START + $MINUTES * 60) }")
R=${OUT:-/tmp/out}/round
mkdir -p "$R"
left() { echo $((DEADLINE - $(date +%s))); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

slice() {
  echo "gpu_round: $(date -u +%FT%TZ), $MINUTES min, commit ${FASTDIFF_COMMIT:-unknown}, fastdiff/ $(fastdiff_sha)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  rm -rf "$WORK" && mkdir -p "$WORK/work" "$WORK/speed"
  cp -a eval/results/fmnist "$WORK/fmnist" 2>/dev/null || mkdir -p "$WORK/fmnist"
  touch "$WORK/start"  # what is newer than this, this slice made

  if speed_due "$(left)"; then
    cap=$(($(left) - RESERVE_SECONDS < SPEED_SECONDS ? $(left) - RESERVE_SECONDS : SPEED_SECONDS))
    echo "== speed table: due (missing, or fastdiff/ changed); at most $cap s"
    t0=$(date +%s)
    # --time-budget stops starting rows 30 s before the cap (a started compile may take that long); with --out the
    # files are rewritten after every row, so a run cut short still leaves what it measured.
    timeout -k 10 "$cap" $PY -m fastdiff bench speed --teacher synthetic:ddpm-cifar --out "$WORK/speed" \
      --steps 10 --warmup 2 --sample-batch-sizes 256 --profile --ablate --time-budget $((cap > 60 ? cap - 30 : cap / 2))
    echo "speed: exit $? in $(($(date +%s) - t0)) s (124: stopped at the cap)"
    for f in "$WORK"/speed/speed-*.json; do
      [ -f "$f" ] || continue
      cp "$f" "${f%.json}.md" "$R"/ && fastdiff_sha > "$R/$(basename "${f%.json}").source"
    done
  else
    echo "== speed table: not due (fresh, or re-measuring it would cost a quality row; SPEED=$SPEED)"
  fi

  if [ "${MEMORY_ROW:-0}" = 1 ]; then  # issue 19's GPU row: SD1.5 shape, batch 4, one GPU (memory.json / .md)
    cap=$(($(left) - RESERVE_SECONDS < MEMORY_SECONDS ? $(left) - RESERVE_SECONDS : MEMORY_SECONDS))
    echo "== memory row (eval/memory.py --sd15-gpu): at most $cap s"
    timeout -k 10 "$cap" $PY eval/memory.py --sd15-gpu --time-budget $((cap / 2)) --out "$WORK/memory" \
      --work "$WORK/memory-work" $MEMORY_ARGS
    echo "memory row: exit $? (124: stopped at the cap; the rows measured are kept)"
    cp "$WORK/memory/results.json" "$R/memory.json" && cp "$WORK/memory/table.md" "$R/memory.md"
  fi

  budget=$(($(left) - RESERVE_SECONDS))
  if [ "$budget" -ge 60 ]; then
    echo "== fmnist quality: $budget s"
    timeout -k 10 "$((budget + 15))" $PY eval/fmnist_quality.py --next --budget-minutes "$(minutes "$budget")" \
      --out "$WORK/fmnist" --work "$WORK/work" --teachers "$TEACHERS" $FMNIST_ARGS
    echo "fmnist quality: exit $? (124: stopped at the slice's end; finished rows are kept)"
  else
    echo "== fmnist quality: skipped, only $budget s left"
  fi

  # The table (fmnist.json holds every row, old and new) and what this slice added beside it.
  cp "$WORK"/fmnist/fmnist.json "$WORK"/fmnist/fmnist.md "$R"/ 2>/dev/null
  (cd "$WORK/fmnist" && find . -type f -newer "$WORK/start" ! -name fmnist.json ! -name fmnist.md -print0 |
     tar -czf "$R/fmnist-extras.tar.gz" --null -T -)
  echo "gpu_round: done in $(($(date +%s) - START)) s, $(left) s to spare; $R holds: $(ls "$R" | tr '\n' ' ')"
}

slice 2>&1 | tee -a "$R/round.log"
