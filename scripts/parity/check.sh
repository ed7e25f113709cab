#!/usr/bin/env bash
# `make parity-check ACESTEP_SRC=/path/to/official/ACE-Step-1.5`: the same lego jobs through both engines.
#
# The acestep engine runs in the image's environment (PARITY_ENV, what `make image-env` builds:
# transformers 4.57, diffusers 0.37.1, the official code from ACESTEP_SRC on PYTHONPATH), the
# diffusers engine in .venv (diffusers 0.42.1, transformers 5).
# A tiny ACE-Step-layout checkpoint is built at run time from the checkout's own model classes and
# converted with `python -m runner convert`; every job runs through the real `python -m runner lego`,
# and the final latents, the stems and the written files are compared. Nothing is written into the
# repository: everything lives under PARITY_WORK (a new temporary folder by default).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
src=${ACESTEP_SRC:?set ACESTEP_SRC to an official ACE-Step 1.5 checkout}
src=$(cd "$src" && pwd)
[ -f "$src/acestep/models/base/modeling_acestep_v15_base.py" ] || { echo "$src is not an ACE-Step 1.5 checkout" >&2; exit 2; }
venv_py=$root/${VENV:-.venv}/bin/python
env_dir=${PARITY_ENV:-.image-env}
[ -x "$env_dir/bin/python" ] || { echo "no image environment in $env_dir: run make image-env (IMAGE_ENV=$env_dir)" >&2; exit 2; }
image_py="$(cd "$env_dir" && pwd)/bin/python"
work=${PARITY_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/acestep-parity.XXXXXX")}
mkdir -p "$work"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 ACESTEP_INIT_LLM=false
echo "parity check: official code $src ($(git -C "$src" rev-parse HEAD 2>/dev/null || echo 'no git metadata')), work folder $work"
echo "image environment $env_dir: $("$image_py" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)' 2>/dev/null)"
echo ".venv: $("$venv_py" -c 'import torch, transformers, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)' 2>/dev/null)"

step() {  # a setup step: its stderr goes to a log, shown when it fails
  "$@" 2> "$work/setup.log" || { echo "failed: $*" >&2; tail -20 "$work/setup.log" >&2; exit 1; }
}
step "$venv_py" -c "from runner.random_checkpoint import write_acestep_layout; write_acestep_layout('$work/project-acestep')"
step env PYTHONPATH="$root:$src" "$image_py" scripts/parity/official_checkpoint.py "$src" "$work/acestep" --project-layout "$work/project-acestep"
step "$venv_py" -m runner convert "$work/acestep" "$work/diffusers"
"$venv_py" - "$work" <<'EOF'
import sys
import numpy as np, soundfile as sf
work = sys.argv[1]
rng = np.random.default_rng(7)
for name, rate, seconds in (("source", 44100, 7.3), ("short", 48000, 3.0), ("long", 48000, 17.0)):
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.4 * np.sin(2 * np.pi * 196 * t) * (1 + np.sin(2 * np.pi * 1.6 * t)) / 2
    audio = np.stack([tone + 0.02 * rng.standard_normal(t.size), 0.8 * tone + 0.02 * rng.standard_normal(t.size)], 1)
    sf.write(f"{work}/{name}.wav", audio.astype(np.float32), rate, subtype="FLOAT")
EOF

status=0
job() {  # label tolerance source batch dtype speedups (the diffusers engine's ACESTEP_SPEEDUPS)
  local label=$1 tolerance=$2 source=$3 batch=$4 dtype=$5 speedups=$6
  local args=(lego --source "$work/$source.wav" --track backing_vocals --bpm 96 --key "F# minor" --time-signature 4/4
              --seed 1234 --steps 8 --batch-size "$batch" --device cpu --dtype "$dtype" --format wav)
  mkdir -p "$work/$label/acestep" "$work/$label/diffusers"
  # From the work folder: ACE-Step writes a .cache/ folder into the current one.
  (cd "$work" && PYTHONPATH="$root:$src" "$image_py" "$root/scripts/parity/run_job.py" "$work/$label/acestep/capture.npz" -- "${args[@]}" \
    --engine acestep --checkpoints "$work/acestep" --out "$work/$label/acestep" > "$work/$label/acestep/events.jsonl" 2> "$work/$label/acestep/stderr.log") \
    || { echo "[$label] the acestep engine failed:"; tail -5 "$work/$label/acestep/stderr.log"; status=1; return; }
  ACESTEP_SPEEDUPS=$speedups "$venv_py" scripts/parity/run_job.py "$work/$label/diffusers/capture.npz" -- "${args[@]}" \
    --engine diffusers --checkpoints "$work/diffusers" --out "$work/$label/diffusers" > "$work/$label/diffusers/events.jsonl" 2> "$work/$label/diffusers/stderr.log" \
    || { echo "[$label] the diffusers engine failed:"; tail -5 "$work/$label/diffusers/stderr.log"; status=1; return; }
  "$venv_py" scripts/parity/compare.py "$label" "$tolerance" "$work/$label/acestep" "$work/$label/diffusers" || status=1
}

# The diffusers engine's own speed-ups off (ACESTEP_SPEEDUPS=none): the same arithmetic as ACE-Step's.
job float32-7.3s-44k-batch2 0 source 2 float32 none
job float32-3s-under-5.12s 0 short 1 float32 none
job float32-17s-two-pieces 0 long 1 float32 none
# With the speed-ups a job runs by default (runner/speedups.py: fused norms, RoPE and attention
# kernels), and in reduced precision, the DiT and the text encoder round in each implementation's
# own order, so the engines agree within a tolerance: the largest difference relative to the larger
# peak of the two. The VAE keeps ACE-Step's precision in both (float32 on the CPU), so the source's
# posterior sample is exact in every job.
job float32-default-speedups "${PARITY_FP32_TOLERANCE:-0.001}" source 2 float32 default
job float16-7.3s-44k-batch2 "${PARITY_FP16_TOLERANCE:-0.01}" source 2 float16 default
job bfloat16-7.3s-44k-batch2 "${PARITY_BF16_TOLERANCE:-0.05}" source 2 bfloat16 default
echo "parity check: $([ $status -eq 0 ] && echo PASS || echo FAIL) (work folder $work)"
exit $status
