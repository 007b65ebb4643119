// EOS pooling on the CPU: gather each prompt's EOS row, LayerNorm, project
// with the text projection, L2-normalise. All math in fp32 (fp64 for fp64).
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include "../acc_type.h"
#include "../checks.h"

namespace hipro {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_eos_cpu(
    const at::Tensor& x, const at::Tensor& eos_index, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& projection, double eps) {
  // The op computes in its documented precision (fp32 / fp64) even inside an
  // autocast region: its at::mm must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_pool_args(x, eos_index, ln_weight, ln_bias, projection);
  const auto eos = eos_index.contiguous();
  check_eos_values(eos, x.size(0));
  const int64_t P = eos_index.numel(), W = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
  const auto xc = x.contiguous();
  const auto gamma = ln_weight.to(acc).contiguous();
  const auto beta = ln_bias.to(acc).contiguous();
  auto x_hat = at::empty({P, W}, x.options().dtype(acc));
  auto y = at::empty({P, W}, x.options().dtype(acc));
  auto rstd = at::empty({P}, x.options().dtype(acc));
  const int64_t* e = eos.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "pool_eos_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const acc_t* g = gamma.data_ptr<acc_t>();
    const acc_t* b = beta.data_ptr<acc_t>();
    acc_t* xh = x_hat.data_ptr<acc_t>();
    acc_t* yp = y.data_ptr<acc_t>();
    acc_t* rs = rstd.data_ptr<acc_t>();
    at::parallel_for(0, P, 8, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* row = xp + e[p] * W;
        acc_t mean = 0;
        for (int64_t w = 0; w < W; ++w) mean += static_cast<acc_t>(row[w]);
        mean /= W;
        acc_t var = 0;
        for (int64_t w = 0; w < W; ++w) {
          const acc_t c = static_cast<acc_t>(row[w]) - mean;
          var += c * c;
        }
        var /= W;
        const acc_t r = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
        rs[p] = r;
        for (int64_t w = 0; w < W; ++w) {
          const acc_t h = (static_cast<acc_t>(row[w]) - mean) * r;
          xh[p * W + w] = h;
          yp[p * W + w] = h * g[w] + b[w];
        }
      }
    });
  });
  auto z = at::mm(y, projection.to(acc));
  auto norm = z.norm(2, {1});
  auto features = z / norm.clamp_min(1e-12).unsqueeze(1);
  return {features, x_hat, rstd, norm};
}

at::Tensor pool_eos_backward_cpu(const at::Tensor& grad_features, const at::Tensor& features,
                                 const at::Tensor& x_hat, const at::Tensor& rstd,
                                 const at::Tensor& proj_norm, const at::Tensor& ln_weight,
                                 const at::Tensor& projection, const at::Tensor& eos_index,
                                 int64_t num_tokens, at::ScalarType x_dtype) {
  // The op computes in its documented precision (fp32 / fp64) even inside an
  // autocast region: its at::mm must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_pool_backward_args(grad_features, features, x_hat, rstd, proj_norm, ln_weight, projection,
                           eos_index, num_tokens, x_dtype);
  check_eos_values(eos_index.contiguous(), num_tokens);
  const int64_t P = x_hat.size(0), W = x_hat.size(1);
  // x_hat is in the forward's accumulation dtype; the loop below reads it and
  // rstd densely in that dtype.
  const auto acc = x_hat.scalar_type();
  const auto xh = x_hat.contiguous();
  const auto rs = rstd.to(acc).contiguous();
  const auto df = grad_features.to(acc);
  // d/dz of z/|z|: project out the feature direction, divide by the norm.
  const auto radial = (df * features).sum(1, true);
  const auto dz = (df - features * radial) / proj_norm.clamp_min(1e-12).unsqueeze(1);
  const auto dxh = at::mm(dz, projection.to(acc).t()) * ln_weight.to(acc).unsqueeze(0);
  auto dx_rows = at::empty({P, W}, dxh.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "pool_eos_backward_cpu", [&] {
    const scalar_t* g = dxh.data_ptr<scalar_t>();
    const scalar_t* h = xh.data_ptr<scalar_t>();
    const scalar_t* r = rs.data_ptr<scalar_t>();
    scalar_t* out = dx_rows.data_ptr<scalar_t>();
    at::parallel_for(0, P, 8, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        scalar_t mean_g = 0, mean_gh = 0;
        for (int64_t w = 0; w < W; ++w) {
          mean_g += g[p * W + w];
          mean_gh += g[p * W + w] * h[p * W + w];
        }
        mean_g /= W;
        mean_gh /= W;
        for (int64_t w = 0; w < W; ++w) {
          out[p * W + w] = r[p] * (g[p * W + w] - mean_g - h[p * W + w] * mean_gh);
        }
      }
    });
  });
  // index_add accumulates if two prompts ever share an EOS token.
  auto grad_x = at::zeros({num_tokens, W}, x_hat.options().dtype(acc));
  grad_x.index_add_(0, eos_index, dx_rows);
  return grad_x.to(x_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(hipro_fast, CPU, m) {
  m.impl("pool_eos", &pool_eos_cpu);
  m.impl("pool_eos_backward", &pool_eos_backward_cpu);
}

}  // namespace hipro
