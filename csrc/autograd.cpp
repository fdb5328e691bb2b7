// Autograd of the two triplet-loss ops, in C++ (the Autograd dispatch key).
//
// Why not torch.library.register_autograd from Python: at small batches the loss is
// launch-bound, and the Python autograd.Function that register_autograd builds cost
// about as much host time per forward+backward as the kernels themselves (measured:
// ~75 us of ~100 us on the 2-core dev machine). In C++ the forward and the backward
// run without touching Python, as torchvision's ops do. The backward calls the
// triplet_loss_backward op through the dispatcher, so it runs on whatever backend the
// forward ran on, and works under torch.compile (AOTAutograd traces it with the fake
// implementations registered in dnnrl_ext/ops.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace dnnrl {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;

Tensor5 call_triplet_loss(const Tensor& x, const Tensor& labels, int64_t mining, int64_t loss_type, double alpha,
                          double gamma, double margin, int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dnnrl_ext::triplet_loss", "")
                       .typed<Tensor5(const Tensor&, const Tensor&, int64_t, int64_t, double, double, double,
                                      int64_t)>();
  return op.call(x, labels, mining, loss_type, alpha, gamma, margin, reduction);
}

Tensor2 call_triplet_loss_indexed(const Tensor& x, const Tensor& anchor, const Tensor& positive,
                                  const Tensor& negative, int64_t loss_type, double alpha, double gamma,
                                  double margin, int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dnnrl_ext::triplet_loss_indexed", "")
                       .typed<Tensor2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                                      double, double, int64_t)>();
  return op.call(x, anchor, positive, negative, loss_type, alpha, gamma, margin, reduction);
}

Tensor call_triplet_loss_backward(const Tensor& grad_loss, const Tensor& x, const std::optional<Tensor>& anchor,
                                  const Tensor& pos, const Tensor& neg, const Tensor& r,
                                  const std::optional<Tensor>& valid, int64_t loss_type, double alpha, double gamma,
                                  double margin, int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dnnrl_ext::triplet_loss_backward", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                     const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t, double,
                                     double, double, int64_t)>();
  return op.call(grad_loss, x, anchor, pos, neg, r, valid, loss_type, alpha, gamma, margin, reduction);
}

void save_params(AutogradContext* ctx, int64_t loss_type, double alpha, double gamma, double margin,
                 int64_t reduction) {
  ctx->saved_data["loss_type"] = loss_type;
  ctx->saved_data["alpha"] = alpha;
  ctx->saved_data["gamma"] = gamma;
  ctx->saved_data["margin"] = margin;
  ctx->saved_data["reduction"] = reduction;
}

// Mined form: outputs (loss, pos, neg, r, valid); only loss is differentiable.
class TripletLossFunction : public torch::autograd::Function<TripletLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& labels, int64_t mining,
                               int64_t loss_type, double alpha, double gamma, double margin, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, pos, neg, r, valid] =
        call_triplet_loss(x, labels, mining, loss_type, alpha, gamma, margin, reduction);
    ctx->save_for_backward({x, pos, neg, r, valid});
    save_params(ctx, loss_type, alpha, gamma, margin, reduction);
    ctx->mark_non_differentiable({pos, neg, r, valid});
    // Only loss has a gradient: without this the engine would fill a zeros_like for each
    // of the four other outputs before every backward (four allocations and fill
    // launches; on the H200 profile, B = 128, most of the backward's host time).
    ctx->set_materialize_grads(false);
    return {loss, pos, neg, r, valid};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    Tensor grad_x;
    if (grads[0].defined()) {
      grad_x = call_triplet_loss_backward(
          grads[0].contiguous(), saved[0], std::nullopt, saved[1], saved[2], saved[3], saved[4],
          ctx->saved_data["loss_type"].toInt(), ctx->saved_data["alpha"].toDouble(),
          ctx->saved_data["gamma"].toDouble(), ctx->saved_data["margin"].toDouble(),
          ctx->saved_data["reduction"].toInt());
    }
    return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Explicit triplets: outputs (loss, r); only loss is differentiable.
class TripletLossIndexedFunction : public torch::autograd::Function<TripletLossIndexedFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& anchor, const Tensor& positive,
                               const Tensor& negative, int64_t loss_type, double alpha, double gamma, double margin,
                               int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, r] =
        call_triplet_loss_indexed(x, anchor, positive, negative, loss_type, alpha, gamma, margin, reduction);
    ctx->save_for_backward({x, anchor, positive, negative, r});
    save_params(ctx, loss_type, alpha, gamma, margin, reduction);
    ctx->mark_non_differentiable({r});
    ctx->set_materialize_grads(false);  // no zeros_like for r before every backward
    return {loss, r};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    Tensor grad_x;
    if (grads[0].defined()) {
      grad_x = call_triplet_loss_backward(
          grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], std::nullopt,
          ctx->saved_data["loss_type"].toInt(), ctx->saved_data["alpha"].toDouble(),
          ctx->saved_data["gamma"].toDouble(), ctx->saved_data["margin"].toDouble(),
          ctx->saved_data["reduction"].toInt());
    }
    return {grad_x, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor5 triplet_loss_autograd(const Tensor& x, const Tensor& labels, int64_t mining, int64_t loss_type, double alpha,
                              double gamma, double margin, int64_t reduction) {
  auto out = TripletLossFunction::apply(x, labels, mining, loss_type, alpha, gamma, margin, reduction);
  return {out[0], out[1], out[2], out[3], out[4]};
}

Tensor2 triplet_loss_indexed_autograd(const Tensor& x, const Tensor& anchor, const Tensor& positive,
                                      const Tensor& negative, int64_t loss_type, double alpha, double gamma,
                                      double margin, int64_t reduction) {
  auto out = TripletLossIndexedFunction::apply(x, anchor, positive, negative, loss_type, alpha, gamma, margin,
                                               reduction);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace dnnrl

TORCH_LIBRARY_IMPL(dnnrl_ext, Autograd, m) {
  m.impl("triplet_loss", &dnnrl::triplet_loss_autograd);
  m.impl("triplet_loss_indexed", &dnnrl::triplet_loss_indexed_autograd);
}
