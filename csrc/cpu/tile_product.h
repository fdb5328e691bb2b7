// The tile product a b^T of the CPU kernels, routed to the fastest exact float32 GEMM
// torch carries.
//
// Why not at::mm alone: torch's float32 at::mm calls MKL, and MKL takes its AVX2 code
// path on non-Intel CPUs even where AVX-512 is there. oneDNN, which torch also ships,
// dispatches on the instruction set. On the 2-core AMD EPYC (AVX-512) dev machine a
// single-threaded 512 x 1024 x 512 float32 tile ran at 238 GFLOP/s through oneDNN
// against 108 GFLOP/s through MKL. oneDNN's dense linear is reached through the
// dispatcher (mkldnn::_linear_pointwise, the op torch.compile's CPU backend emits), so
// a torch built without it falls back to at::mm instead of failing to load.
//
// On an Intel CPU MKL takes its AVX-512 path, so that reason is gone, and each oneDNN call
// costs more around the product (a boxed dispatch, a fresh output, a cache lookup): on the
// Intel Xeon host of the pool (family 6 model 167, 2 threads) the loss forward at D = 512
// took 186 / 416 / 993 us at B = 128 / 256 / 512 through oneDNN against 138 / 376 / 935 us
// through at::mm, and the k-NN vote at FER-2013 scale 0.38-0.39 s either way (session 24).
// So the default ("auto") sends float32 tiles to oneDNN on other vendors' CPUs only.
// DNNRL_CPU_TILE_GEMM=onednn|mm|auto (read at every call) overrides it, for the tests of
// both paths and for timing them on any host.
//
// The arithmetic is IEEE float32; only the summation order differs from MKL's
// (checked with torch 2.14: the op ignores torch.backends.mkldnn.matmul.fp32_precision
// = "bf16"; should a later torch honour it, tiles would follow the user's setting as
// at::mm does). torch.backends.mkldnn.enabled = False sends every tile to at::mm.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif

namespace dnnrl {
namespace cpu {

// The oneDNN dense linear op, when this torch has it (looked up once).
inline const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    if (!at::hasMKLDNN()) return std::nullopt;
    return c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  }();
  return op;
}

// Whether this CPU's vendor string is "GenuineIntel" (cpuid leaf 0; read once).
inline bool cpu_is_intel() {
  static const bool intel = []() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return false;
    char vendor[13];
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    vendor[12] = '\0';
    return std::strcmp(vendor, "GenuineIntel") == 0;
#else
    return false;
#endif
  }();
  return intel;
}

// DNNRL_CPU_TILE_GEMM: unset, "" or "auto" (oneDNN on non-Intel CPUs), "onednn", "mm".
// Read at every call: a getenv costs nanoseconds against a tile's microseconds.
enum class TileGemm { kAuto, kOnednn, kMm };
inline TileGemm tile_gemm_setting() {
  const char* v = std::getenv("DNNRL_CPU_TILE_GEMM");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return TileGemm::kAuto;
  if (std::strcmp(v, "onednn") == 0) return TileGemm::kOnednn;
  if (std::strcmp(v, "mm") == 0) return TileGemm::kMm;
  TORCH_CHECK(false, "DNNRL_CPU_TILE_GEMM must be auto, onednn or mm, got '", v, "'");
}

// Whether float32 tiles go to oneDNN in this call: this torch has it, the user's mkldnn
// switch is on, and DNNRL_CPU_TILE_GEMM asks for it (auto: on a non-Intel CPU).
inline bool use_onednn_tiles(at::ScalarType dtype) {
  const TileGemm setting = tile_gemm_setting();  // checked even where the dtype makes it moot
  if (dtype != at::kFloat || !onednn_linear_op().has_value() || !at::globalContext().userEnabledMkldnn()) {
    return false;
  }
  return setting == TileGemm::kOnednn || (setting == TileGemm::kAuto && !cpu_is_intel());
}

// Concurrency: the kernels call this from several at::parallel_for workers at once.
// ideep (torch's oneDNN layer) keeps its primitive cache per thread and oneDNN's own
// cache is thread-safe, so that is safe; each worker compiles a new shape once.
//
// Multiply-adds below which a tile stays with at::mm: oneDNN compiles a kernel for
// every new shape (0.6-1.3 ms measured), more than such a product costs, and random
// shapes (tests, tail tiles) would each pay it. A 64 x 64 x 512 tile (the loss at
// B = 128) is at the threshold and was faster through oneDNN once compiled.
constexpr int64_t kOnednnMinWork = int64_t(1) << 21;

// a (m, D), b (n, D), both contiguous rows of the same dtype: returns a b^T (m, n),
// contiguous. `allow_onednn` comes from use_onednn_tiles(). `scratch` is an (at least
// m * n)-element buffer the at::mm path writes into; the oneDNN path returns a fresh
// tensor.
inline at::Tensor tile_product(const at::Tensor& a, const at::Tensor& b, bool allow_onednn, void* scratch) {
  if (allow_onednn && a.size(0) * b.size(0) * a.size(1) >= kOnednnMinWork) {
    std::vector<c10::IValue> stack;
    stack.reserve(6);
    stack.emplace_back(a);
    stack.emplace_back(b);
    stack.emplace_back(c10::IValue());  // no bias
    stack.emplace_back(std::string("none"));
    stack.emplace_back(c10::List<std::optional<at::Scalar>>());
    stack.emplace_back(std::string(""));
    onednn_linear_op()->callBoxed(&stack);
    return stack[0].toTensor();
  }
  at::Tensor out = at::from_blob(scratch, {a.size(0), b.size(0)}, a.options());
  at::mm_out(out, a, b.t());
  return out;
}

}  // namespace cpu
}  // namespace dnnrl
