# Shared steps of gpu_check.sh and gpu_session.sh (sourced, not run): the step clock,
# the machine line, the carried wheels and the in-place sm_90 build.
t0=$(date +%s)
step() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

# nvidia-smi / torch versions; install the wheels carried in .whl (pytorch-metric-learning)
machine_and_wheels() {
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.version.cuda)"
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
}

# build_inplace LOG: the extension for sm_90 in place (ptxas report in LOG); 1 on failure
build_inplace() {
  step "build (sm_90)"
  # the card's architecture only, and exported: tests/test_build.py then knows that the
  # default list (sm_80 + sm_90 + compute_90 PTX) was not used
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  if ! FORCE_CUDA=1 MAX_JOBS=16 DNNRL_PTXAS_VERBOSE=1 \
       timeout ${BUILD_TIMEOUT:-240} python3 setup.py build_ext --inplace > "$1" 2>&1; then
    tail -n 60 "$1"; echo "BUILD FAILED"; return 1
  fi
  grep -E "^dnnrl:" "$1"
  return 0
}
