// EOS pooling on CUDA; same semantics as cpu/pool_eos_cpu.cpp. All math in
// fp32 (fp64 for fp64 input).
//
// Forward:
//   1. pool_layernorm_kernel, one block per prompt p: gathers row eos[p] of x,
//      two-pass mean / variance with fixed-order block reductions, writes
//      x_hat[p] = (x - mean) * rstd, rstd[p] and y[p] = x_hat * gamma + beta.
//   2. z = at::mm(y, projection) (cuBLAS).
//   3. l2_normalize_kernel, one block per prompt: norm[p] = |z[p]|,
//      features[p] = z[p] / max(norm, 1e-12).
// Backward:
//   1. radial_projection_kernel, one block per prompt:
//      dz = (df - f * <df, f>) / max(norm, 1e-12).
//   2. dxh = at::mm(dz, projection^T).
//   3. layernorm_backward_kernel, one block per prompt, with g = dxh * gamma:
//      dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
//   4. grad_x = zeros[T, W].index_add_(0, eos, dx) (accumulates if two
//      prompts share an EOS token), cast to x's dtype.
//
// Index checks: the gather kernel checks each eos index with a device-side
// assertion instead of the CPU op's host loop (no device->host sync); the
// backward's index_add_ checks its indices itself.
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "common.cuh"

namespace hipro {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
pool_layernorm_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ eos_index,
                      const at::opmath_type<scalar_t>* __restrict__ gamma,
                      const at::opmath_type<scalar_t>* __restrict__ beta,
                      at::opmath_type<scalar_t>* __restrict__ x_hat,
                      at::opmath_type<scalar_t>* __restrict__ y,
                      at::opmath_type<scalar_t>* __restrict__ rstd, int64_t T, int64_t W,
                      at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kWarpSize + 1];
  const int64_t p = blockIdx.x;
  const int64_t e = eos_index[p];
  CUDA_KERNEL_ASSERT_MSG(e >= 0 && e < T, "hipro_fast.pool_eos: eos_index out of range");
  const scalar_t* row = x + e * W;

  acc_t sum = 0;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) sum += static_cast<acc_t>(row[w]);
  const acc_t mean = block_allreduce_sum(sum, scratch) / static_cast<acc_t>(W);

  acc_t sq = 0;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    const acc_t c = static_cast<acc_t>(row[w]) - mean;
    sq += c * c;
  }
  const acc_t var = block_allreduce_sum(sq, scratch) / static_cast<acc_t>(W);
  const acc_t r = acc_t(1) / dev_sqrt(var + eps);
  if (threadIdx.x == 0) rstd[p] = r;

  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    const acc_t h = (static_cast<acc_t>(row[w]) - mean) * r;
    x_hat[p * W + w] = h;
    y[p * W + w] = h * gamma[w] + beta[w];
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
l2_normalize_kernel(const acc_t* __restrict__ z, acc_t* __restrict__ features,
                    acc_t* __restrict__ norm, int64_t E) {
  __shared__ acc_t scratch[kWarpSize + 1];
  const int64_t p = blockIdx.x;
  const acc_t* row = z + p * E;
  acc_t sq = 0;
  for (int64_t i = threadIdx.x; i < E; i += blockDim.x) sq += row[i] * row[i];
  const acc_t n = dev_sqrt(block_allreduce_sum(sq, scratch));
  if (threadIdx.x == 0) norm[p] = n;
  const acc_t denom = n > acc_t(1e-12) ? n : acc_t(1e-12);
  for (int64_t i = threadIdx.x; i < E; i += blockDim.x) features[p * E + i] = row[i] / denom;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
radial_projection_kernel(const acc_t* __restrict__ grad_features,
                         const acc_t* __restrict__ features, const acc_t* __restrict__ norm,
                         acc_t* __restrict__ dz, int64_t E) {
  __shared__ acc_t scratch[kWarpSize + 1];
  const int64_t p = blockIdx.x;
  const acc_t* df = grad_features + p * E;
  const acc_t* f = features + p * E;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < E; i += blockDim.x) s += df[i] * f[i];
  const acc_t radial = block_allreduce_sum(s, scratch);
  const acc_t n = norm[p];
  const acc_t denom = n > acc_t(1e-12) ? n : acc_t(1e-12);
  for (int64_t i = threadIdx.x; i < E; i += blockDim.x) {
    dz[p * E + i] = (df[i] - f[i] * radial) / denom;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
layernorm_backward_kernel(const acc_t* __restrict__ dxh, const acc_t* __restrict__ gamma,
                          const acc_t* __restrict__ x_hat, const acc_t* __restrict__ rstd,
                          acc_t* __restrict__ dx, int64_t W) {
  __shared__ acc_t scratch[kWarpSize + 1];
  const int64_t p = blockIdx.x;
  acc_t sg = 0, sgh = 0;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    const acc_t g = dxh[p * W + w] * gamma[w];
    sg += g;
    sgh += g * x_hat[p * W + w];
  }
  const acc_t mean_g = block_allreduce_sum(sg, scratch) / static_cast<acc_t>(W);
  const acc_t mean_gh = block_allreduce_sum(sgh, scratch) / static_cast<acc_t>(W);
  const acc_t r = rstd[p];
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) {
    const acc_t g = dxh[p * W + w] * gamma[w];
    dx[p * W + w] = r * (g - mean_g - x_hat[p * W + w] * mean_gh);
  }
}

void check_pool_args(const at::Tensor& x, const at::Tensor& eos_index, const at::Tensor& ln_weight,
                     const at::Tensor& ln_bias, const at::Tensor& projection) {
  check_pool_shapes(x, eos_index, ln_weight, ln_bias, projection);
  check_floating(x, "x");
  check_floating(ln_weight, "ln_weight");
  check_floating(ln_bias, "ln_bias");
  check_floating(projection, "projection");
  check_on_device(x, x, "x");
  check_on_device(eos_index, x, "eos_index");
  check_on_device(ln_weight, x, "ln_weight");
  check_on_device(ln_bias, x, "ln_bias");
  check_on_device(projection, x, "projection");
  TORCH_CHECK(eos_index.numel() <= std::numeric_limits<int32_t>::max(),
              "too many prompts for one launch: ", eos_index.numel());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_eos_cuda(
    const at::Tensor& x, const at::Tensor& eos_index, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& projection, double eps) {
  // The op computes in its documented precision (fp32 / fp64) even inside an
  // autocast region: its at::mm must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_pool_args(x, eos_index, ln_weight, ln_bias, projection);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t P = eos_index.numel(), T = x.size(0), W = x.size(1);
  const auto acc = acc_scalar_type(x.scalar_type());
  const auto xc = x.contiguous();
  const auto eos = eos_index.contiguous();
  const auto gamma = ln_weight.to(acc).contiguous();
  const auto beta = ln_bias.to(acc).contiguous();
  auto x_hat = at::empty({P, W}, x.options().dtype(acc));
  auto y = at::empty({P, W}, x.options().dtype(acc));
  auto rstd = at::empty({P}, x.options().dtype(acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "pool_eos_cuda",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      pool_layernorm_kernel<scalar_t><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
          xc.data_ptr<scalar_t>(), eos.data_ptr<int64_t>(), gamma.data_ptr<acc_t>(),
          beta.data_ptr<acc_t>(), x_hat.data_ptr<acc_t>(), y.data_ptr<acc_t>(),
          rstd.data_ptr<acc_t>(), T, W, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto z = at::mm(y, projection.to(acc)).contiguous();
  const int64_t E = z.size(1);
  auto features = at::empty({P, E}, z.options());
  auto norm = at::empty({P}, z.options());
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "pool_eos_cuda_normalize", [&] {
      l2_normalize_kernel<scalar_t><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(), E);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {features, x_hat, rstd, norm};
}

at::Tensor pool_eos_backward_cuda(const at::Tensor& grad_features, const at::Tensor& features,
                                  const at::Tensor& x_hat, const at::Tensor& rstd,
                                  const at::Tensor& proj_norm, const at::Tensor& ln_weight,
                                  const at::Tensor& projection, const at::Tensor& eos_index,
                                  int64_t num_tokens, at::ScalarType x_dtype) {
  // The op computes in its documented precision (fp32 / fp64) even inside an
  // autocast region: its at::mm must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x_hat.dim() == 2, "x_hat must be [P, W], got ", shape_of(x_hat));
  const int64_t P = x_hat.size(0), W = x_hat.size(1);
  const auto acc = x_hat.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "x_hat must be float32 or float64, got ",
              acc);
  TORCH_CHECK(projection.dim() == 2 && projection.size(0) == W, "projection must be [", W,
              ", E], got ", shape_of(projection));
  const int64_t E = projection.size(1);
  TORCH_CHECK(grad_features.dim() == 2 && grad_features.size(0) == P &&
                  grad_features.size(1) == E,
              "grad_features must be [", P, ", ", E, "], got ", shape_of(grad_features));
  TORCH_CHECK(features.sizes() == grad_features.sizes(), "features must be [", P, ", ", E,
              "], got ", shape_of(features));
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == P, "rstd must be [", P, "]");
  TORCH_CHECK(proj_norm.dim() == 1 && proj_norm.size(0) == P, "proj_norm must be [", P, "]");
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == W, "ln_weight must be [", W, "]");
  check_index_vector(eos_index, "eos_index", P);
  TORCH_CHECK(num_tokens >= 0, "num_tokens must be >= 0, got ", num_tokens);
  check_floating(grad_features, "grad_features");
  check_floating(features, "features");
  check_floating(rstd, "rstd");
  check_floating(proj_norm, "proj_norm");
  check_floating(ln_weight, "ln_weight");
  check_floating(projection, "projection");
  check_on_device(x_hat, x_hat, "x_hat");
  check_on_device(grad_features, x_hat, "grad_features");
  check_on_device(features, x_hat, "features");
  check_on_device(rstd, x_hat, "rstd");
  check_on_device(proj_norm, x_hat, "proj_norm");
  check_on_device(ln_weight, x_hat, "ln_weight");
  check_on_device(projection, x_hat, "projection");
  check_on_device(eos_index, x_hat, "eos_index");
  TORCH_CHECK(P <= std::numeric_limits<int32_t>::max(), "too many prompts for one launch: ", P);
  const c10::cuda::CUDAGuard guard(x_hat.device());

  const auto df = grad_features.to(acc).contiguous();
  const auto f = features.to(acc).contiguous();
  const auto xh = x_hat.contiguous();
  const auto rs = rstd.to(acc).contiguous();
  const auto nrm = proj_norm.to(acc).contiguous();
  const auto gamma = ln_weight.to(acc).contiguous();
  auto dz = at::empty({P, E}, xh.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "pool_eos_backward_cuda_radial", [&] {
      radial_projection_kernel<scalar_t><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
          df.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), nrm.data_ptr<scalar_t>(),
          dz.data_ptr<scalar_t>(), E);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dxh = at::mm(dz, projection.to(acc).t()).contiguous();
  auto dx_rows = at::empty({P, W}, xh.options());
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "pool_eos_backward_cuda_layernorm", [&] {
      layernorm_backward_kernel<scalar_t><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
          dxh.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), xh.data_ptr<scalar_t>(),
          rs.data_ptr<scalar_t>(), dx_rows.data_ptr<scalar_t>(), W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto grad_x = at::zeros({num_tokens, W}, xh.options());
  grad_x.index_add_(0, eos_index, dx_rows);
  return grad_x.to(x_dtype);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(hipro_fast, CUDA, m) {
  m.impl("pool_eos", &cuda::pool_eos_cuda);
  m.impl("pool_eos_backward", &cuda::pool_eos_backward_cuda);
}

}  // namespace hipro
