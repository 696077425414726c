#!/usr/bin/env bash
# Multi-GPU checks of train.py and the weak-scaling benchmark, in one call (about 7 minutes on an H200 x4):
#   bash tests/gpu/multi_gpu_train.sh                 # every stage the visible GPUs allow
#   bash tests/gpu/multi_gpu_train.sh equivalence     # or: scaling
# Stages:
#   equivalence  DiT-S/2 256px, global batch 32, 20 steps, --deterministic, synthetic data, uncompiled:
#                1 GPU vs 2 GPUs (FSDP) give the same loss curve (per step within 1% relative, mean within
#                0.3%: bf16 GEMMs round differently at batch 32 and 16 per GPU); the 2-GPU checkpoint of step
#                10 resumes on 1 GPU and, given 4 GPUs, on 4, and continues the 2-GPU curve (same tolerance).
#   scaling      bench/train_step.py, DiT-XL/2 at 128 images per GPU, under torchrun on 1, 2 (and 4) GPUs:
#                weak-scaling efficiency = img/s(N) / (N x img/s(1)), target >= 0.95; peak memory of each.
# Everything goes to $OUT (default ./multi_gpu_out): logs, metrics.jsonl of each run, bench JSONs, and
# summary.json with every comparison and whether it passed. Exit status 1 if any check failed.
set -u
OUT=${OUT:-multi_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
STAGES=${*:-equivalence scaling}
STEPS=20
HALF=10
TRAIN_ARGS=(--model DiT-S/2 --image-size 256 --global-batch-size 32 --max-steps $STEPS --ckpt-every $HALF
            --log-every 1 --sample-every 0 --num-workers 4 --deterministic --no-compile --attn sdpa --run-name run)
echo "$GPUS GPU(s) visible; stages: $STAGES; output in $OUT"
status=0

launch() {  # launch NAME NPROC ARGS...: train.py on the first NPROC GPUs, log to $OUT/NAME.log
  local name=$1 nproc=$2; shift 2
  local devices
  devices=$(seq -s, 0 $((nproc - 1)))
  local start=$SECONDS
  echo "=== $name: $nproc GPU(s)"
  CUDA_VISIBLE_DEVICES=$devices python3 -m torch.distributed.run --standalone --nproc_per_node="$nproc" train.py "$@" \
    >"$OUT/$name.log" 2>&1 || { echo "!!! $name failed (see $OUT/$name.log)"; tail -n 20 "$OUT/$name.log"; status=1; }
  echo "=== $name took $((SECONDS - start)) s"
}

for stage in $STAGES; do
  case $stage in
    equivalence)
      launch one_gpu 1 "${TRAIN_ARGS[@]}" --results-dir "$OUT/one_gpu"
      launch two_gpu 2 "${TRAIN_ARGS[@]}" --results-dir "$OUT/two_gpu"
      ckpt="$OUT/two_gpu/run/checkpoints/$(printf %07d $HALF)"
      launch resume_2_on_1 1 "${TRAIN_ARGS[@]}" --results-dir "$OUT/resume_2_on_1" --resume "$ckpt"
      if [ "$GPUS" -ge 4 ]; then
        launch resume_2_on_4 4 "${TRAIN_ARGS[@]}" --results-dir "$OUT/resume_2_on_4" --resume "$ckpt"
      fi
      ;;
    scaling)
      for n in 1 2 4; do
        [ "$n" -le "$GPUS" ] || continue
        start=$SECONDS
        echo "=== scaling_x$n"
        CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) python3 -m torch.distributed.run --standalone --nproc_per_node=$n -m bench.train_step \
          --per-gpu-batch 128 --only-dit-fast --steps 15 --out "$OUT/train_step_x$n.json" >"$OUT/scaling_x$n.log" 2>&1 \
          || { echo "!!! scaling_x$n failed (see $OUT/scaling_x$n.log)"; tail -n 20 "$OUT/scaling_x$n.log"; status=1; }
        echo "=== scaling_x$n took $((SECONDS - start)) s"
      done
      ;;
    *) echo "unknown stage '$stage'; choose equivalence or scaling"; exit 2 ;;
  esac
done

OUT="$OUT" HALF=$HALF python3 - <<'EOF' || status=1
"""Compare the runs and the benchmarks; write summary.json; exit 1 if a check failed."""
import json
import os
import statistics
from pathlib import Path

out, half = Path(os.environ["OUT"]), int(os.environ["HALF"])
STEP_RTOL, MEAN_RTOL, SCALING_TARGET = 1e-2, 3e-3, 0.95


def losses(name):
    path = out / name / "run" / "metrics.jsonl"
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines())} if path.is_file() else None


def compare(name, reference, candidate, steps):
    if reference is None or candidate is None or not set(steps) <= set(reference) & set(candidate):
        return {"check": name, "passed": False, "reason": "a run is missing or incomplete"}
    rel = [abs(candidate[s] - reference[s]) / abs(reference[s]) for s in steps]
    passed = max(rel) <= STEP_RTOL and statistics.mean(rel) <= MEAN_RTOL
    return {"check": name, "passed": passed, "steps": [steps[0], steps[-1]], "max_rel_diff": max(rel),
            "mean_rel_diff": statistics.mean(rel), "tolerance": {"max": STEP_RTOL, "mean": MEAN_RTOL}}


checks = []
if (out / "one_gpu").exists():
    one, two = losses("one_gpu"), losses("two_gpu")
    all_steps = sorted(one or [])
    checks.append(compare("1 GPU vs 2 GPUs (FSDP), same global batch", one, two, all_steps))
    after = [s for s in all_steps if s > half]
    for name in ("resume_2_on_1", "resume_2_on_4"):
        if (out / name).exists():
            checks.append(compare(f"2-GPU checkpoint of step {half} resumed: {name}", two, losses(name), after))
bench = {}
for n in (1, 2, 4):
    path = out / f"train_step_x{n}.json"
    if path.is_file():
        row = json.loads(path.read_text())["results"][0]
        bench[n] = {"img_per_s": row["img_per_s"], "per_gpu_batch": row["per_gpu_batch"], "median_ms": row["median_ms"],
                    "mfu": row["mfu"], "peak_mem_gib": row["peak_mem_gib"]}
for n in (2, 4):
    if n in bench and 1 in bench:
        efficiency = bench[n]["img_per_s"] / (n * bench[1]["img_per_s"])
        checks.append({"check": f"weak scaling x{n} (128 per GPU)", "passed": efficiency >= SCALING_TARGET,
                       "efficiency": efficiency, "target": SCALING_TARGET})
summary = {"checks": checks, "scaling": bench, "passed": all(c["passed"] for c in checks)}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
raise SystemExit(0 if summary["passed"] else 1)
EOF
exit $status
