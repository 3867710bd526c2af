#!/usr/bin/env bash
# The paper's Figure 2 story on real data, offline, in minutes on a CPU:
#   the gap is there at initialisation, CLIP training keeps it, CLIP + ATP + CU closes it.
#
#   bash examples/figure2.sh OUT                       # scikit-learn digits, tiny random CLIP
#   bash examples/figure2.sh OUT --train DATA/train --test DATA/test --model ViT-B-32:laion2b_s34b_b79k
#   bash examples/figure2.sh OUT --train T --test V --image-model IMG --text-model TXT --label label
#
# Options: --train/--test (paired datasets `gapkit embed` reads; default: the digits written by
# examples/make_digits.py), --model SPEC or --image-model SPEC --text-model SPEC (default: the tiny
# open_clip config examples/tiny-clip.json with random weights), --label COLUMN (colour and
# clustering; default label), --epochs N (20), --batch-size N (64), --lr LR (5e-4; use about 1e-5
# for pretrained towers), --device D, --seed S.
# Writes OUT/table.md, OUT/figure2.png, OUT/hist.png. Rerunning resumes: finished steps are kept.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
OUT=$1; shift
HERE=$(cd "$(dirname "$0")" && pwd)
TRAIN="" TEST="" LABEL=label EPOCHS=20 BATCH=64 LR=5e-4 SEED=0 DEVICE="" MODEL_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --train) TRAIN=$2; shift 2 ;;
    --test) TEST=$2; shift 2 ;;
    --model|--image-model|--text-model|--image-pooling|--text-pooling) MODEL_ARGS+=("$1" "$2"); shift 2 ;;
    --label) LABEL=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --batch-size) BATCH=$2; shift 2 ;;
    --lr) LR=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[ ${#MODEL_ARGS[@]} -gt 0 ] || MODEL_ARGS=(--model "$HERE/tiny-clip.json:random")
DEV=(); [ -n "$DEVICE" ] && DEV=(--device "$DEVICE")
mkdir -p "$OUT"

# the console script, or the module where the script is not on PATH yet (e.g. pyenv before a rehash)
command -v gapkit > /dev/null || gapkit() { python -m gapkit "$@"; }
step() { printf '\n== %s\n' "$*" >&2; }

if [ -z "$TRAIN" ]; then
  if [ ! -f "$OUT/data/test/metadata.jsonl" ]; then
    step "writing scikit-learn's handwritten digits as an image-caption dataset"
    python "$HERE/make_digits.py" "$OUT/data" --seed "$SEED" >&2
  fi
  TRAIN=$OUT/data/train TEST=$OUT/data/test
fi
[ -n "$TEST" ] || { echo "--train needs --test (the held-out pairs)" >&2; exit 2; }

step "1/5 embed the held-out pairs with the initial (untrained) encoders"
[ -f "$OUT/init/info.json" ] || gapkit embed "$TEST" "${MODEL_ARGS[@]}" "${DEV[@]}" -o "$OUT/init"

for LOSS in clip clip+atp+cu; do
  NAME=${LOSS//+/-}
  step "2/5 fine-tune end to end with $LOSS (seed $SEED, $EPOCHS epochs)"
  # Same seed, split and budget for both: all epochs run (--patience 0) and the epoch kept is
  # chosen by validation retrieval (val_rsum), which means the same for every loss; val_loss
  # does not (it differs between losses and, with the schedule, between epochs).
  # clip+atp+cu uses the authors' schedules (ATP weight 1 -> 2 after 50 %, CU 1 -> 0 from 20 % to 70 %).
  SCHED=(); [ "$LOSS" = clip ] || SCHED=(--schedule)
  # --resume continues an interrupted run and leaves a finished one as it is.
  gapkit finetune "$TRAIN" "${MODEL_ARGS[@]}" "${DEV[@]}" --loss "$LOSS" "${SCHED[@]}" \
    --epochs "$EPOCHS" --patience 0 --early-stop val_rsum --lr "$LR" --batch-size "$BATCH" \
    --seed "$SEED" --val-fraction 0.1 --resume -o "$OUT/run-$NAME"
  step "3/5 embed the held-out pairs with the $LOSS encoders"
  [ -f "$OUT/$NAME/info.json" ] || gapkit embed "$TEST" --heads "$OUT/run-$NAME" "${DEV[@]}" -o "$OUT/$NAME"
done

step "4/5 measure init, clip, clip+atp+cu on the held-out pairs"
gapkit measure "$OUT/init" "$OUT/clip" "$OUT/clip-atp-cu" --names "init,clip,clip+atp+cu" \
  --label "$LABEL" --format markdown -o "$OUT/table.md"
cat "$OUT/table.md"

step "5/5 plot Figure 2 and the cosine histograms"
gapkit plot umap "$OUT/init" "$OUT/clip" "$OUT/clip-atp-cu" --titles "init,CLIP,CLIP+ATP+CU" \
  --color-by "$LABEL" -o "$OUT/figure2.png"
gapkit plot hist "$OUT/init" "$OUT/clip" "$OUT/clip-atp-cu" --titles "init,CLIP,CLIP+ATP+CU" -o "$OUT/hist.png"
step "done: $OUT/table.md, $OUT/figure2.png, $OUT/hist.png"
