#!/usr/bin/env bash
# One device command (the `device` tool's `run`): train the local stage's network from step 0 on the lent GPU within
# SECONDS and bring the runs back through $OUT. Windows are generated on the machine's cores (`usb_training.local
# data`, GEN_WORKERS processes) while two networks train on the GPU on the same, growing window folder: run "a" with
# the shipped size (channels 16,32,64) and run "b" with B_ARGS (default: wider, --channels 32,64,128; any other
# `train` options for a new run folder, e.g. "--base prior"), each making its batches in LOADERS processes
# and ending its learning-rate decay with its budget (`train --fit-schedule`). At the end each run's EMA weights,
# config, history and the windows' summary go to $OUT (`usb_training.local.device_carry pack`).
# Prepare here first (CPU), then run with carry [".whl", ".device_cache"] (both git-ignored, ~21 MB together):
#   ../shared/tools/device_wheels.sh "monai==1.6.1 nibabel==5.4.2"
#   .venv/bin/python -m usb_training.local.device_carry pack-cache --cache ~/.cache/usb_training \
#       --archive .device_cache/local_cache.tar.xz                        # the prepared anatomies, float16 (16 MB)
#   run: bash .ci/device_train_local.sh 530        (timeout_s 590)
# Afterwards, here: `python -m usb_training.local.device_carry unpack --carried <files_at> --dest RUNS`, then
# `python -m usb_training.local export --work RUNS/a ...` and the tuning yardstick (docs/training.md).
# A dry run on the CPU: `GEN_WORKERS=1 LOADERS=1 BATCH=2 OUT=/tmp/o bash .ci/device_train_local.sh 150 cpu`.
set -u
total=${1:-530}; device=${2:-cuda}
out=${OUT:-/tmp/out}; cache=/tmp/usb_local_cache; work=${WORK:-/tmp/usb_local_train}
gen_workers=${GEN_WORKERS:-10}; loaders=${LOADERS:-2}; batch=${BATCH:-16}; b_args=${B_ARGS:---channels 32,64,128}
export USB_THREADS=${USB_THREADS:-2} PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site
python3 -m usb_training.local.device_carry unpack-cache --archive .device_cache/local_cache.tar.xz --cache "$cache" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; nproc
rm -rf "$work"; mkdir -p "$work/windows" "$work/a" "$work/b" "$out"
ln -s "$work/windows" "$work/a/windows"; ln -s "$work/windows" "$work/b/windows"

python3 -m usb_training.local data --work "$work/a" --cache "$cache" --seed 40 --count 100000 \
    --workers "$gen_workers" > "$out/data.log" 2>&1 &
gen=$!
until [ "$(ls -d "$work"/windows/shard_* 2>/dev/null | wc -l)" -ge 4 ]; do
  if ! kill -0 $gen 2>/dev/null; then echo "window generation failed:"; tail -n 20 "$out/data.log"; exit 1; fi
  if [ "$(elapsed)" -gt 240 ]; then echo "no windows after 240 s"; tail -n 20 "$out/data.log"; exit 1; fi
  sleep 2
done
minutes=$(python3 -c "print(max(0.5, ($total - $(elapsed) - 25) / 60))")
echo "$(elapsed) s: $(ls -d "$work"/windows/shard_* | wc -l) shards; training for $minutes min"
common=(--device "$device" --loader-workers "$loaders" --batch "$batch" --steps 1000000 --minutes "$minutes"
        --fit-schedule)
python3 -m usb_training.local train --work "$work/a" "${common[@]}" > "$out/train_a.log" 2>&1 &
ta=$!
# shellcheck disable=SC2086  # B_ARGS is a list of options
python3 -m usb_training.local train --work "$work/b" "${common[@]}" $b_args > "$out/train_b.log" 2>&1 &
tb=$!
while kill -0 $ta 2>/dev/null || kill -0 $tb 2>/dev/null; do
  sleep 5
  if [ "$(elapsed)" -ge $(( total - 20 )) ]; then break; fi
done
kill $gen 2>/dev/null; pkill -f "usb_training.local data" 2>/dev/null
wait $ta $tb 2>/dev/null
echo "$(elapsed) s: training ended"; tail -n 3 "$out/train_a.log" "$out/train_b.log"
python3 -m usb_training.local.device_carry pack --work "$work" --out "$out"
echo "$(elapsed) s: packed"; ls -la "$out"
