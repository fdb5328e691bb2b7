#!/usr/bin/env bash
# The emulated CUDA kernels under AddressSanitizer: a CPU stand-in for compute-sanitizer's
# memcheck that finds out-of-bounds reads and writes of the kernels in tensor memory and in
# the emulated shared memory (docs/cuda_emulator.md). Builds build/cuda_emu_asan the first
# time (about a minute on two cores).
#   usage: bash tools/cuda_emu/memcheck.sh [pytest arguments]
#   default: the emulator's tests and the emulated cases of the two CUDA path files
set -euo pipefail
cd "$(dirname "$0")/../.."
export DNNRL_EMU_ASAN=1
# torch and python are not built with ASan: only the kernels' accesses are checked; leaks and
# the mismatch checks would report the interpreter's own habits.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:detect_odr_violation=0:halt_on_error=1}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if [ $# -eq 0 ]; then
  set -- tests/test_cuda_emulated.py tests/test_cuda_loss_paths.py tests/test_knn_cuda_paths.py -k emu
fi
# libstdc++ beside the runtime: python does not link it, and ASan's interceptor of C++ throws
# must find it at start-up (otherwise the first exception a kernel's host code raises aborts)
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  exec python3 -m pytest -q -p no:cacheprovider "$@"
