#!/usr/bin/env bash
# One GPU session's work, in stages (each well inside the device's 10-minute command limit):
#   bash bench/gpu_check.sh tests     # GPU test suite (pytest -m gpu) + the CPU suite's kernel tests on CUDA
#   bash bench/gpu_check.sh kernels   # bench/kernels.py + bench/attention.py
#   bash bench/gpu_check.sh kernel-tests  # the kernel tests on CUDA and the fast model's GPU tests
#   bash bench/gpu_check.sh model     # bench/model.py
#   bash bench/gpu_check.sh sampling  # bench/sampling.py
#   bash bench/gpu_check.sh train     # bench/train_step.py
#   bash bench/gpu_check.sh sweep     # bench/kernel_sweep.py: launch configs of the adaLN kernels
#   bash bench/gpu_check.sh quick     # the GPU test of `python -m bench --quick` (its output kept in $OUT/quick)
#   bash bench/gpu_check.sh learn     # the DiT-S/4 learning test of train.py (tests/gpu/test_train_gpu.py)
#   bash bench/gpu_check.sh fsdp-profile  # (2+ GPUs) profiled FSDP train steps at 128 per GPU on 1 and 2 GPUs
#   bash bench/gpu_check.sh microbench  # pytest bench/ --benchmark-only (JSON in $OUT/microbench.json)
#   SUITE_PARTS="training sampling" bash bench/gpu_check.sh suite  # `python -m bench` on every visible GPU
#     (default: all parts; SUITE_TIME_BUDGET, default 450 s, stops starting tasks in time for the 10-minute limit)
# Results and logs go to $OUT (default ./gpu_out). Installs the package in place without touching torch.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
  echo "editable install failed (see install.log); importing from the tree instead"
  [ -e dit_fast/kernels ] || ln -s ../kernels dit_fast/kernels  # what setup.py's package_dir does
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .whl ]; then  # optional pure-Python wheels carried with the call (diffusers for the sampling comparison)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site
fi
status=0
KERNEL_TESTS="tests/test_ln_modulate.py tests/test_gated_residual.py tests/test_final_layer.py tests/test_bias_gelu.py tests/test_partial_sums.py"
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember a failure, go on
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1 || { echo "!!! $name failed (exit $?)"; status=1; }
  echo "=== $name took $((SECONDS - start)) s"; tail -n 25 "$OUT/$name.log"
}
for stage in "$@"; do
  case $stage in
    tests)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
      # the kernels' default cases on CUDA, then everything marked gpu (GPU_TESTS narrows the paths)
      step kernel_tests_cuda python3 -m pytest -q -p no:cacheprovider --timeout=600 $KERNEL_TESTS
      step gpu_tests python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 ${GPU_TESTS:-tests} ;;
    kernels)
      step bench_kernels python3 -m bench.kernels --out "$OUT/kernels.json"
      step bench_attention python3 -m bench.attention --out "$OUT/attention.json" ;;
    kernel-tests)
      step kernel_tests_cuda python3 -m pytest -q -p no:cacheprovider --timeout=600 $KERNEL_TESTS
      step gpu_kernel_tests python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 \
        tests/gpu/test_kernels_gpu.py tests/gpu/test_fast_model_gpu.py
      ;;
    model) step bench_model python3 -m bench.model --out "$OUT/model.json" ;;
    sampling)
      step sampling_tests python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 tests/gpu/test_sampling_gpu.py
      step bench_sampling python3 -m bench.sampling --out "$OUT/sampling.json" ;;
    train) step bench_train python3 -m bench.train_step --out "$OUT/train_step.json" ;;
    sweep) step kernel_sweep python3 -m bench.kernel_sweep --out "$OUT/kernel_sweep.json" ;;
    quick)
      step bench_quick python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=1500 --basetemp="$OUT/quick" \
        tests/gpu/test_bench_quick_gpu.py ;;
    suite)
      step bench_suite python3 -m bench --gpus "$(nvidia-smi -L | wc -l)" --parts ${SUITE_PARTS:-flops kernels attention training sampling model train_step scaling} \
        --time-budget "${SUITE_TIME_BUDGET:-450}" --out-dir "$OUT/suite" ;;
    fsdp-profile)  # weak scaling at 128 per GPU with bench.model's GPU-time split: 1 GPU, then 2 under torchrun
      step fsdp_x1 python3 -m bench.train_step --per-gpu-batch 128 --only-dit-fast --steps 20 --profile --out "$OUT/fsdp_x1.json"
      step fsdp_x2 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m bench.train_step \
        --per-gpu-batch 128 --only-dit-fast --steps 20 --profile --out "$OUT/fsdp_x2.json" ;;
    microbench)  # the pytest-benchmark micro-benchmarks and their regression check (bench/test_microbench.py)
      step microbench python3 -m pytest -q -p no:cacheprovider --timeout=900 bench/ --benchmark-only \
        --benchmark-json "$OUT/microbench.json" ;;
    learn)
      step learning_test python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 \
        tests/gpu/test_train_gpu.py -k learns ;;
    *) echo "unknown stage '$stage'; choose tests, kernel-tests, kernels, model, sampling, train, sweep, quick, suite, fsdp-profile, microbench, learn"; exit 2 ;;
  esac
done
exit $status
