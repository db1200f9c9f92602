#!/usr/bin/env bash
# Every GPU check that keel's open work still needs, as one call of the device tool (15 minutes of device time a
# session, start-up included: this script stays under ~10 minutes, each part with its own timeout). Results under
# $OUT; a summary is printed last. Correctness comes first.
#
#   here:  ../shared/gpu/wheelhouse.sh && benchmarks/gpu_wheels.sh          # .gpu-wheels/ (+ safetensors)
#   there: device tool, carry [".gpu-wheels"], command: bash benchmarks/gpu_session.sh
#   here, without a GPU, the flow only:  SMOKE=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh
#
# 1. flash attention (docs/kernels.md): benchmarks/attention.py --quick: the compiled kernels against the float32
#    reference, then TFLOP/s against cuDNN, XLA and JAX's Pallas kernel.
# 2. the planner against the GPU (docs/parallel.md): `keel plan`'s predicted step time of the 1b preset on one
#    H200 beside the measured median step of a short bf16 run of the same shape, batch and remat.
# 3. inference (docs/models.md): `keel generate` prefill and decode tokens/s of that 1B model, batch 1 and 8.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
py=$(command -v python3.12 || command -v python3)
if [ "${SMOKE:-0}" = 1 ]; then
  py=${PY:-.venv/bin/python}
  attention=(--cpu-smoke); config=(--config tiny); shape=(train.batch_size=4 data.seq_len=128); steps=12
else
  bash shared/gpu/setup.sh >"$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/gpu.csv" 2>&1
  attention=(--quick); config=(--config 1b); shape=(train.batch_size=8 data.seq_len=4096); steps=40
fi
"$py" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())" \
  | tee "$OUT/versions.txt"

echo "== 1. flash attention"
OUT="$OUT" timeout 330 "$py" benchmarks/attention.py "${attention[@]}" --out "$OUT" >"$OUT/attention.log" 2>&1
echo "attention rc=$?"; tail -30 "$OUT/attention.log"

echo "== 2. planner vs measured step"
timeout 60 "$py" -m keel plan "${config[@]}" "${shape[@]}" --hardware h200 --chips 1 --remat dots_no_batch --json \
  >"$OUT/plan.json" 2>"$OUT/plan.err"; echo "plan rc=$?"
timeout 300 "$py" -m keel train --no-progress "${config[@]}" run_dir="$OUT/run" "${shape[@]}" train.steps=$steps \
  optim.warmup_steps=5 train.log_every=1 train.eval_every=1000 checkpoint.every=1000 train.max_restarts=0 \
  train.sample_tokens=0 >"$OUT/train.log" 2>&1
echo "train rc=$?"; tail -4 "$OUT/train.log"

echo "== 3. generate"
for b in 1 8; do
  timeout 120 "$py" -m keel generate "$OUT/run" --prompt "def main():" --max-new-tokens 128 --batch $b \
    --temperature 0 --json >"$OUT/generate_b$b.json" 2>"$OUT/generate_b$b.err"; echo "generate batch $b rc=$?"
done

"$py" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    row = json.loads((out / "plan.json").read_text())["rows"][0]
    predicted = row["time"]["total_s"]
    steps = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if '"step_s"' in x]
    measured = statistics.median(x["step_s"] for x in steps[len(steps) // 4:])
    mfu = statistics.median(x["mfu"] for x in steps[len(steps) // 4:])
    print(f"planner: predicted step {predicted:.3f}s (MFU {row['mfu']:.1%}, compute {row['time']['compute_s']:.3f}s); "
          f"measured median {measured:.3f}s (MFU {mfu:.1%}); measured / predicted {measured / predicted:.2f}")
except Exception as e:  # noqa: BLE001
    print("planner comparison: not available:", e)
for b in (1, 8):
    try:
        g = json.loads((out / f"generate_b{b}.json").read_text())
        print(f"generate batch {b}: prefill {g['prefill_tokens_per_s']:,.0f} tokens/s, decode "
              f"{g['decode_tokens_per_s']:,.0f} tokens/s, compile {g['compile_s']:.1f}s")
    except Exception as e:  # noqa: BLE001
        print(f"generate batch {b}: not available:", e)
PY
rm -rf "$OUT/run/checkpoints" "$OUT/run/data" "$OUT/run/compile_cache"
