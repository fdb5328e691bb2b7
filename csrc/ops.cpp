// Operator schemas of dnnrl_ext (the dispatcher's view of the library) and the
// pybind11 module that `import dnnrl_ext._C` loads. Kernels live in cpu/ and cuda/
// and register themselves with TORCH_LIBRARY_IMPL; autograd is registered in C++
// (autograd.cpp), the fake (meta) implementations from Python in dnnrl_ext/ops.py.
#include <Python.h>
#include <torch/library.h>
#include <torch/extension.h>

#include <string>

#include "cpu/tile_product.h"

TORCH_LIBRARY(dnnrl_ext, m) {
  // Fused mining + triplet loss over one batch with integer labels.
  //   x (B, D) float{16,32,64}/bfloat16, labels (B,) integer.
  //   mining: 0 batch_hard, 1 semi_hard, 2 easy_positive; loss_type: 0 exp, 1 hinge;
  //   reduction: 0 none, 1 mean, 2 sum.
  // Returns loss (() or (B,), float32; float64 for float64 x), pos (B,) int64,
  // neg (B,) int64 (-1 for invalid anchors), r (B,) (0 for invalid), valid (B,) bool.
  m.def(
      "triplet_loss(Tensor x, Tensor labels, int mining, int loss_type, float alpha, "
      "float gamma, float margin, int reduction) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Same loss on explicit triplets: anchor/positive/negative (T,) int64 indices into x.
  // Returns loss (() or (T,)) and r (T,).
  m.def(
      "triplet_loss_indexed(Tensor x, Tensor anchor, Tensor positive, Tensor negative, "
      "int loss_type, float alpha, float gamma, float margin, int reduction) -> (Tensor, Tensor)");
  // Gradient of either form w.r.t. x from the saved indices (no second mining pass).
  //   anchor: None for the mined form (anchor t is row t), else (T,) int64.
  //   valid: None when every triplet is valid, else (T,) bool.
  //   grad_loss: () for mean/sum, (T,) for none.  Returns (B, D) in x's dtype.
  m.def(
      "triplet_loss_backward(Tensor grad_loss, Tensor x, Tensor? anchor, Tensor pos, "
      "Tensor neg, Tensor r, Tensor? valid, int loss_type, float alpha, float gamma, "
      "float margin, int reduction) -> Tensor");
  // k nearest gallery rows of every query by squared Euclidean distance, sorted
  // ascending, ties to the smaller index: dist (Q, k) float32/float64, idx (Q, k) int64.
  m.def("knn(Tensor query, Tensor gallery, int k) -> (Tensor, Tensor)");
  // Majority vote of the k nearest: pred (Q,) int64, votes (Q, num_classes) int64.
  // A tie in votes goes to the tied class whose nearest member ranks first.
  m.def(
      "knn_vote(Tensor query, Tensor gallery, Tensor gallery_labels, int k, int num_classes) "
      "-> (Tensor, Tensor)");
}

#ifdef DNNRL_WITH_CUDA
namespace dnnrl {
namespace cuda {
std::pair<int64_t, int64_t> knn_candidate_stats();  // cuda/knn_cuda.cu
}  // namespace cuda
}  // namespace dnnrl
#endif

namespace {
// (queries left to the exact pass, queries) of the last CUDA knn / knn_vote call when it
// ran with DNNRL_KNN_STATS=1 and took the candidate path; (-1, -1) otherwise.
std::pair<int64_t, int64_t> knn_candidate_stats() {
#ifdef DNNRL_WITH_CUDA
  return dnnrl::cuda::knn_candidate_stats();
#else
  return {-1, -1};
#endif
}

// The GEMM the CPU kernels' float32 tiles take in this call: "onednn" or "mm" (at::mm, MKL).
std::string cpu_tile_gemm() { return dnnrl::cpu::use_onednn_tiles(at::kFloat) ? "onednn" : "mm"; }

bool compiled_with_cuda() {
#ifdef DNNRL_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Compiled kernels of dnnrl_ext (ops are registered under torch.ops.dnnrl_ext)";
  module.def("compiled_with_cuda", &compiled_with_cuda,
             "True when the CUDA kernels were compiled into this build");
  module.def("cpu_tile_gemm", &cpu_tile_gemm,
             "The GEMM of the CPU kernels' float32 tiles now: 'onednn' or 'mm' (csrc/cpu/tile_product.h)");
  module.def("knn_candidate_stats", &knn_candidate_stats,
             "(exact-pass queries, queries) of the last CUDA knn call under DNNRL_KNN_STATS=1, "
             "(-1, -1) when the candidate path did not run");
}
