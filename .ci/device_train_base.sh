#!/usr/bin/env bash
# One device command (the `device` tool's `run`): train tier `base` on the lent GPU within MINUTES and bring the
# bundle back through $OUT. Prepare here first (CPU), then run with carry [".whl", ".device_cache"] (both git-ignored,
# together < 64 MiB: the wheels ~7 MB, the prepared 1 mm sources ~40 MB; never the downloaded source archives):
#   ../shared/tools/device_wheels.sh monai nibabel einops packaging
#   .venv/bin/python -m usb_training.data prepare --tier base          # into ~/.cache/usb_training (downloads)
#   mkdir -p .device_cache/prepared && cp -r ~/.cache/usb_training/prepared/160x192x160_1mm .device_cache/prepared/
#   run: bash .ci/device_train_base.sh 8.5        (timeout_s 590)
# Afterwards: `python -m usb_training.evaluation.generation --model <files_at>/usb-base` here, and ship only if it beats tiny.
set -euo pipefail
MINUTES=${1:-8.5}
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m usb_training.latent.device --tier base --cache .device_cache --work /tmp/usb_base_run --out "$OUT/usb-base" \
  --minutes "$MINUTES" --keep-local-from USBLib/models/usb-tiny ${USB_DEVICE_OVERRIDES:+--overrides "$USB_DEVICE_OVERRIDES"} \
  2>&1 | tail -n 60
cp /tmp/usb_base_run/autoencoder/history.json "$OUT/usb-base/autoencoder_history.json"
cp /tmp/usb_base_run/diffusion/history.json "$OUT/usb-base/diffusion_history.json"
