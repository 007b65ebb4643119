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
// Argument checks: check_pool_args / check_pool_backward_args of ../checks.h,
// as in the CPU op. Index values: the gather kernel checks each eos index
// with a device-side assertion instead of the CPU op's host loop (no
// device->host sync); the backward's index_add_ checks its indices itself.
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

// One block per prompt: P must fit the grid (beyond the checks shared with
// the CPU op, ../checks.h).
void check_prompt_count(int64_t P) {
  check_at_most(P, std::numeric_limits<int32_t>::max(),
                "hipro_fast.pool_eos (CUDA): the number of prompts (one block each)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_eos_cuda(
    const at::Tensor& x, const at::Tensor& eos_index, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& projection, double eps) {
  // The op computes in its documented precision (fp32 / fp64) even inside an
  // autocast region: its at::mm must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_pool_args(x, eos_index, ln_weight, ln_bias, projection);
  check_prompt_count(eos_index.numel());
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
  check_pool_backward_args(grad_features, features, x_hat, rstd, proj_norm, ln_weight, projection,
                           eos_index, num_tokens, x_dtype);
  const int64_t P = x_hat.size(0), W = x_hat.size(1), E = projection.size(1);
  const auto acc = x_hat.scalar_type();
  check_prompt_count(P);
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
