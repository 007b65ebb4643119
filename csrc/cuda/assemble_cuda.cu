// Forest assembly on CUDA; same semantics as cpu/assemble_cpu.cpp.
//
//   forward:  out[t, w] = (ctx_row[t] >= 0 ? ctx_table[ctx_row[t], w]
//                                          : token_embedding[vocab_id[t], w])
//                         + positional_embedding[position[t], w]
//             one thread per output element (grid-stride loop over T * W),
//             the sum in fp32 (fp64 for fp64) then rounded to the dtype.
//   backward: grad_ctx[r] = sum over tokens t with ctx_row[t] == r of grad_out[t];
//             a gather, not a scatter: one thread per grad_ctx element walks
//             its row's token list (context_rows.h, built on the device with
//             a stable sort) in ascending token order and sums in fp32 (fp64
//             for fp64), then rounds once. No atomics: the result is the same
//             run after run and bitwise equal to the CPU op, which walks the
//             same lists with the same function.
//
// Argument checks: check_assemble_args / check_assemble_backward_args of
// ../checks.h, as in the CPU op. Index values: the CPU op validates them on
// the host. Doing that here would need a device->host copy and a sync per
// call, so the kernels check each index as they read it with a device-side
// assertion instead (like ATen's own gather kernels): an out-of-range index
// stops the kernel rather than reading out of bounds.
#include "common.cuh"
#include "../context_rows.h"

namespace hipro {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void assemble_forest_kernel(const scalar_t* __restrict__ ctx,
                                       const scalar_t* __restrict__ emb,
                                       const scalar_t* __restrict__ pos,
                                       const int64_t* __restrict__ ctx_row,
                                       const int64_t* __restrict__ vocab_id,
                                       const int64_t* __restrict__ position,
                                       scalar_t* __restrict__ out, int64_t T, int64_t W,
                                       int64_t R, int64_t V, int64_t L) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = T * W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t t = i / W;
    const int64_t w = i - t * W;
    const int64_t r = ctx_row[t];
    const scalar_t* src;
    if (token_reads_context(r)) {
      CUDA_KERNEL_ASSERT_MSG(r < R, "hipro_fast.assemble_forest: ctx row out of range");
      src = ctx + r * W;
    } else {
      const int64_t vid = vocab_id[t];
      CUDA_KERNEL_ASSERT_MSG(vid >= 0 && vid < V,
                             "hipro_fast.assemble_forest: vocab id out of range");
      src = emb + vid * W;
    }
    const int64_t p = position[t];
    CUDA_KERNEL_ASSERT_MSG(p >= 0 && p < L, "hipro_fast.assemble_forest: position out of range");
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(src[w]) +
                                   static_cast<acc_t>(pos[p * W + w]));
  }
}

template <typename scalar_t>
__global__ void assemble_forest_backward_kernel(const scalar_t* __restrict__ grad_out,
                                                const int64_t* __restrict__ sorted_rows,
                                                const int64_t* __restrict__ token_order,
                                                const int64_t* __restrict__ row_start,
                                                scalar_t* __restrict__ grad_ctx, int64_t T,
                                                int64_t W, int64_t R) {
  using acc_t = at::opmath_type<scalar_t>;
  // The rows are sorted, so the last is the largest: one check covers every token.
  if (blockIdx.x == 0 && threadIdx.x == 0 && T > 0) {
    CUDA_KERNEL_ASSERT_MSG(sorted_rows[T - 1] < R,
                           "hipro_fast.assemble_forest_backward: ctx row out of range");
  }
  const int64_t n = R * W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t r = i / W, w = i - r * W;
    acc_t sum;
    context_row_grad<acc_t>(grad_out, token_order, row_start, r, W, w, w + 1, &sum);
    grad_ctx[i] = static_cast<scalar_t>(sum);
  }
}

at::Tensor assemble_forest_cuda(const at::Tensor& ctx_table, const at::Tensor& token_embedding,
                                const at::Tensor& positional_embedding,
                                const at::Tensor& token_ctx_row, const at::Tensor& token_vocab_id,
                                const at::Tensor& token_position) {
  check_assemble_args(ctx_table, token_embedding, positional_embedding, token_ctx_row,
                      token_vocab_id, token_position);
  const int64_t T = token_ctx_row.numel();
  const int64_t W = ctx_table.size(1);
  const c10::cuda::CUDAGuard guard(ctx_table.device());
  const auto ctx = ctx_table.contiguous();
  const auto emb = token_embedding.contiguous();
  const auto pos = positional_embedding.contiguous();
  const auto crow = token_ctx_row.contiguous();
  const auto vid = token_vocab_id.contiguous();
  const auto tpos = token_position.contiguous();
  auto out = at::empty({T, W}, ctx_table.options());
  if (T * W == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ctx.scalar_type(),
                                  "assemble_forest_cuda", [&] {
    assemble_forest_kernel<scalar_t><<<elementwise_blocks(T * W, kThreads), kThreads, 0,
                                       stream>>>(
        ctx.data_ptr<scalar_t>(), emb.data_ptr<scalar_t>(), pos.data_ptr<scalar_t>(),
        crow.data_ptr<int64_t>(), vid.data_ptr<int64_t>(), tpos.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), T, W, ctx.size(0), emb.size(0), pos.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor assemble_forest_backward_cuda(const at::Tensor& grad_out,
                                         const at::Tensor& token_ctx_row,
                                         int64_t num_ctx_rows) {
  check_assemble_backward_args(grad_out, token_ctx_row, num_ctx_rows);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t T = grad_out.size(0), W = grad_out.size(1);
  const auto g = grad_out.contiguous();
  const ContextRowTokens rows = context_row_tokens(token_ctx_row, num_ctx_rows);
  auto grad_ctx = at::empty({num_ctx_rows, W}, grad_out.options());
  // Launched even when R * W == 0 (one block) so that a stray ctx row still asserts.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "assemble_forest_backward_cuda", [&] {
    assemble_forest_backward_kernel<scalar_t>
        <<<elementwise_blocks(num_ctx_rows * W, kThreads), kThreads, 0,
           stream>>>(g.data_ptr<scalar_t>(), rows.sorted_rows.data_ptr<int64_t>(),
                     rows.token_order.data_ptr<int64_t>(), rows.row_start.data_ptr<int64_t>(),
                     grad_ctx.data_ptr<scalar_t>(), T, W, num_ctx_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_ctx;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(hipro_fast, CUDA, m) {
  m.impl("assemble_forest", &cuda::assemble_forest_cuda);
  m.impl("assemble_forest_backward", &cuda::assemble_forest_backward_cuda);
}

}  // namespace hipro
