// Tree attention on CUDA. Same semantics as cpu/tree_attention_cpu.cpp: query
// token q of segment s attends to every ancestor segment of s in full and to
// its own segment causally; scores, softmax and accumulation run in fp32
// (fp64 for fp64); lse is returned in that accumulation type.
//
// The work is split as on the CPU, by the shared segment-block decomposition
// (../attention_blocks.h): the descendant queries of each blocked segment
// (the context segments, almost all visible pairs) attend to it through
// batched GEMMs (cuBLAS, tensor cores for half types), called from the host
// code below through ATen; the kernels here take only the residual pairs,
// selected by residual_key_ranges / residual_query_end (../tree_index.h, the
// functions the CPU loops call) from the plan's device flags `blocked`. The
// kernels write unnormalised (o, m, l) and fp32/fp64 gradients; the shared
// code merges the blocks in plan order and finalises. The plan is computed
// from a host copy of the segment table once per table (cached, see
// attention_block_plan), so repeated calls neither copy nor sync.
//
// Thread mapping (all kernels use one warp per (token, head) row of D
// elements; lane l holds elements d = l + 32 * i, i < NPL, so rows are read
// coalesced and D may be any value up to 32 * 8 = 256):
//   * forward:   one block per query token t; thread 0 fills the residual key
//                ranges (residual_key_ranges) in shared memory once for all
//                heads, then the block's warps loop over heads. Each warp
//                streams over the visible keys, kKeysPerStep at a time
//                (independent warp reductions for ILP), with an online
//                (flash-style) softmax.
//   * delta:     one warp per (t, h): delta = rowsum(dO * O).
//   * dQ:        query-centric, same mapping as the forward; recomputes
//                p = exp(s - lse) for each residual key.
//   * dK, dV:    key-centric, one block per (key token j, head h); the block's
//                kSplit warps split the queries that meet j in the residual,
//                [j, residual_query_end(seg(j))), round robin, then the
//                per-warp partial sums are added in warp order through
//                shared memory. For a key of a blocked (context) segment
//                that range ends with its own segment, so no warp walks the
//                hundreds of queries below a root-context key any more.
// q, k, v may be row-strided (slices of a packed [T, 3, H, D] qkv): token t,
// head h of q starts at q + t * q_rs + h * D; grad_out is contiguous
// [T, H, D]; the kernels' outputs are contiguous, in the accumulation type.
// No atomics: every output element is written by exactly one thread after a
// fixed-order reduction, so these kernels are bitwise reproducible run to run;
// the whole op is as long as cuBLAS is for the block GEMMs
// (CUBLAS_WORKSPACE_CONFIG=:4096:8, which scripts/gpu_check.sh sets).
//
// Index validation: the host-side checks of the CPU op need the index data on
// the host (a device sync). Here a small validation kernel evaluates the same
// predicates (segment_row_valid / token_in_segment in tree_index.h) on the
// device before the attention kernels, on the same stream, and stops with a
// device-side assertion on a malformed forest (the block planner also checks
// the table's rows on its host copy, raising). Shapes, dtypes, devices and
// row layouts are checked on the host by the checks the CPU op runs too
// (check_attention_args in ../checks.h), plus this backend's launch limits.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "../attention_blocks.h"
#include "common.cuh"

namespace hipro {
namespace cuda {
namespace {

constexpr int kAttnWarps = 4;           // warps per block in the fwd / dQ kernels
constexpr int kAttnThreads = kAttnWarps * kWarpSize;
constexpr int kSplit = 4;               // warps per (key, head) in the dK/dV kernel
constexpr int kKeysPerStep = 4;         // keys per online-softmax step
constexpr int kMaxElemsPerLane = 8;     // D <= 32 * 8 = 256
constexpr int64_t kMaxHeadDim = kWarpSize * kMaxElemsPerLane;

// Row (token) strides of q, k, v in elements.
struct RowStrides {
  int64_t q, k, v;
};

inline RowStrides row_strides(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.stride(0), k.stride(0), v.stride(0)};
}

// ---------------------------------------------------------------------------
// Validation.

__global__ void validate_forest_kernel(const int64_t* __restrict__ table,
                                       const int64_t* __restrict__ token_segment,
                                       int64_t num_segments, int64_t num_tokens) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < num_segments + num_tokens; i += stride) {
    if (i < num_segments) {
      CUDA_KERNEL_ASSERT_MSG(segment_row_valid(table, i, num_tokens),
                             "hipro_fast.tree_attention: malformed segment_table row");
    } else {
      const int64_t t = i - num_segments;
      CUDA_KERNEL_ASSERT_MSG(token_in_segment(table, num_segments, t, token_segment[t]),
                             "hipro_fast.tree_attention: token outside its segment");
    }
  }
}

void launch_validate(const at::Tensor& segment_table, const at::Tensor& token_segment,
                     cudaStream_t stream) {
  const int64_t S = segment_table.size(0), T = token_segment.numel();
  if (S + T == 0) return;
  constexpr int threads = 256;
  validate_forest_kernel<<<elementwise_blocks(S + T, threads), threads, 0, stream>>>(
      segment_table.data_ptr<int64_t>(), token_segment.data_ptr<int64_t>(), S, T);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Thread 0 of the block writes the residual key ranges of query token t into
// shared memory; returns their count to every thread.
__device__ __forceinline__ int load_key_ranges(const int64_t* __restrict__ table,
                                               const int64_t* __restrict__ token_segment,
                                               const uint8_t* __restrict__ blocked, int64_t t,
                                               int64_t* s_begin, int64_t* s_end, int* s_count) {
  if (threadIdx.x == 0) {
    const int n =
        residual_key_ranges(table, blocked, token_segment[t], t, s_begin, s_end, kMaxDepth);
    CUDA_KERNEL_ASSERT_MSG(n >= 0, "hipro_fast.tree_attention: forest deeper than kMaxDepth");
    *s_count = n < 0 ? 0 : n;
  }
  __syncthreads();
  return *s_count;
}

// Loads row `row` (D elements) into the lane's NPL registers (0 past D).
template <int NPL, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ row, int64_t D, int lane,
                                         acc_t (&reg)[NPL]) {
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int64_t d = lane + kWarpSize * i;
    reg[i] = d < D ? static_cast<acc_t>(row[d]) : acc_t(0);
  }
}

// The lane's share of dot(reg, row).
template <int NPL, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t partial_dot(const acc_t (&reg)[NPL],
                                             const scalar_t* __restrict__ row, int64_t D,
                                             int lane) {
  acc_t s = 0;
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int64_t d = lane + kWarpSize * i;
    if (d < D) s += reg[i] * static_cast<acc_t>(row[d]);
  }
  return s;
}

// acc += alpha * row
template <int NPL, typename scalar_t, typename acc_t>
__device__ __forceinline__ void axpy_row(acc_t alpha, const scalar_t* __restrict__ row, int64_t D,
                                         int lane, acc_t (&acc)[NPL]) {
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int64_t d = lane + kWarpSize * i;
    if (d < D) acc[i] += alpha * static_cast<acc_t>(row[d]);
  }
}

template <int NPL, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(const acc_t (&reg)[NPL], acc_t mul, int64_t D, int lane,
                                          scalar_t* __restrict__ row) {
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int64_t d = lane + kWarpSize * i;
    if (d < D) row[d] = static_cast<scalar_t>(reg[i] * mul);
  }
}

// ---------------------------------------------------------------------------
// Forward.

// Writes o (unnormalised, relative to m), m (max scaled score) and l (sum of
// exp(score - m)) of the residual keys, for attention_blocks_forward to merge.
template <typename scalar_t, int NPL>
__global__ void __launch_bounds__(kAttnThreads)
tree_attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                          const scalar_t* __restrict__ v,
                          at::opmath_type<scalar_t>* __restrict__ o_out,
                          at::opmath_type<scalar_t>* __restrict__ m_out,
                          at::opmath_type<scalar_t>* __restrict__ l_out,
                          const int64_t* __restrict__ table,
                          const int64_t* __restrict__ token_segment,
                          const uint8_t* __restrict__ blocked, int64_t H, int64_t D,
                          RowStrides rs, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int64_t s_begin[kMaxDepth];
  __shared__ int64_t s_end[kMaxDepth];
  __shared__ int s_count;
  const int64_t t = blockIdx.x;
  const int num_ranges =
      load_key_ranges(table, token_segment, blocked, t, s_begin, s_end, &s_count);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  for (int64_t h = warp; h < H; h += kAttnWarps) {
    const int64_t item = t * H + h;
    acc_t qr[NPL];
    load_row<NPL>(q + t * rs.q + h * D, D, lane, qr);
    acc_t o[NPL];
#pragma unroll
    for (int i = 0; i < NPL; ++i) o[i] = 0;
    acc_t m = neg_infinity<acc_t>();  // running max of the scaled scores
    acc_t l = 0;                      // running sum of exp(score - m)

    for (int r = 0; r < num_ranges; ++r) {
      const int64_t key_end = s_end[r];
      for (int64_t j0 = s_begin[r]; j0 < key_end; j0 += kKeysPerStep) {
        acc_t s[kKeysPerStep];
#pragma unroll
        for (int b = 0; b < kKeysPerStep; ++b) {
          const int64_t j = j0 + b;
          s[b] = j < key_end ? partial_dot<NPL>(qr, k + j * rs.k + h * D, D, lane) : acc_t(0);
        }
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
#pragma unroll
          for (int b = 0; b < kKeysPerStep; ++b) s[b] += __shfl_xor_sync(kFullMask, s[b], offset);
        }
        // Every lane holds identical scores, so the branches below are uniform.
        acc_t m_new = m;
#pragma unroll
        for (int b = 0; b < kKeysPerStep; ++b) {
          if (j0 + b < key_end) {
            s[b] *= scale;
            m_new = s[b] > m_new ? s[b] : m_new;
          }
        }
        const acc_t corr = m == neg_infinity<acc_t>() ? acc_t(0) : dev_exp(m - m_new);
        l *= corr;
#pragma unroll
        for (int i = 0; i < NPL; ++i) o[i] *= corr;
#pragma unroll
        for (int b = 0; b < kKeysPerStep; ++b) {
          const int64_t j = j0 + b;
          if (j < key_end) {
            const acc_t p = dev_exp(s[b] - m_new);
            l += p;
            axpy_row<NPL>(p, v + j * rs.v + h * D, D, lane, o);
          }
        }
        m = m_new;
      }
    }
    // The own segment holds t itself, so l > 0 and m is finite.
    store_row<NPL>(o, acc_t(1), D, lane, o_out + item * D);
    if (lane == 0) {
      m_out[item] = m;
      l_out[item] = l;
    }
  }
}

// ---------------------------------------------------------------------------
// Backward.

// delta[t, h] = dot(dO[t, h], O[t, h]); one warp per row.
template <typename scalar_t>
__global__ void attention_delta_kernel(const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ out,
                                       at::opmath_type<scalar_t>* __restrict__ delta,
                                       int64_t rows, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) +
                      threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warp leaves together
  acc_t s = 0;
  for (int64_t d = lane; d < D; d += kWarpSize) {
    s += static_cast<acc_t>(grad_out[row * D + d]) * static_cast<acc_t>(out[row * D + d]);
  }
  s = warp_allreduce_sum(s);
  if (lane == 0) delta[row] = s;
}

// dQ[t, h] = scale * sum_j p_tj (dp_tj - delta_t) k_j over t's residual keys.
template <typename scalar_t, int NPL>
__global__ void __launch_bounds__(kAttnThreads)
tree_attention_dq_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                         const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                         const at::opmath_type<scalar_t>* __restrict__ lse,
                         const at::opmath_type<scalar_t>* __restrict__ delta,
                         at::opmath_type<scalar_t>* __restrict__ dq,
                         const int64_t* __restrict__ table,
                         const int64_t* __restrict__ token_segment,
                         const uint8_t* __restrict__ blocked, int64_t H, int64_t D,
                         RowStrides rs, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int64_t s_begin[kMaxDepth];
  __shared__ int64_t s_end[kMaxDepth];
  __shared__ int s_count;
  const int64_t t = blockIdx.x;
  const int num_ranges =
      load_key_ranges(table, token_segment, blocked, t, s_begin, s_end, &s_count);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  for (int64_t h = warp; h < H; h += kAttnWarps) {
    const int64_t item = t * H + h;
    acc_t qr[NPL], gr[NPL], acc[NPL];
    load_row<NPL>(q + t * rs.q + h * D, D, lane, qr);
    load_row<NPL>(grad_out + item * D, D, lane, gr);
#pragma unroll
    for (int i = 0; i < NPL; ++i) acc[i] = 0;
    const acc_t row_lse = lse[item];
    const acc_t row_delta = delta[item];

    for (int r = 0; r < num_ranges; ++r) {
      const int64_t key_end = s_end[r];
      for (int64_t j0 = s_begin[r]; j0 < key_end; j0 += kKeysPerStep) {
        acc_t s[kKeysPerStep], dp[kKeysPerStep];
#pragma unroll
        for (int b = 0; b < kKeysPerStep; ++b) {
          const int64_t j = j0 + b;
          const bool valid = j < key_end;
          s[b] = valid ? partial_dot<NPL>(qr, k + j * rs.k + h * D, D, lane) : acc_t(0);
          dp[b] = valid ? partial_dot<NPL>(gr, v + j * rs.v + h * D, D, lane) : acc_t(0);
        }
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
#pragma unroll
          for (int b = 0; b < kKeysPerStep; ++b) {
            s[b] += __shfl_xor_sync(kFullMask, s[b], offset);
            dp[b] += __shfl_xor_sync(kFullMask, dp[b], offset);
          }
        }
#pragma unroll
        for (int b = 0; b < kKeysPerStep; ++b) {
          const int64_t j = j0 + b;
          if (j < key_end) {
            const acc_t p = dev_exp(s[b] * scale - row_lse);
            axpy_row<NPL>(p * (dp[b] - row_delta) * scale, k + j * rs.k + h * D, D, lane, acc);
          }
        }
      }
    }
    store_row<NPL>(acc, acc_t(1), D, lane, dq + item * D);
  }
}

// dK[j, h] = scale * sum_t p_tj (dp_tj - delta_t) q_t and dV[j, h] = sum_t p_tj dO_t
// over the queries t in [j, residual_query_end(seg(j))).
template <typename scalar_t, int NPL>
__global__ void __launch_bounds__(kSplit * kWarpSize)
tree_attention_dkdv_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                           const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                           const at::opmath_type<scalar_t>* __restrict__ lse,
                           const at::opmath_type<scalar_t>* __restrict__ delta,
                           at::opmath_type<scalar_t>* __restrict__ dk,
                           at::opmath_type<scalar_t>* __restrict__ dv,
                           const int64_t* __restrict__ table,
                           const int64_t* __restrict__ token_segment,
                           const uint8_t* __restrict__ blocked, int64_t H, int64_t D,
                           RowStrides rs, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowElems = NPL * kWarpSize;
  __shared__ acc_t s_dk[kSplit][kRowElems];
  __shared__ acc_t s_dv[kSplit][kRowElems];
  const int64_t item = blockIdx.x;  // j * H + h
  const int64_t j = item / H;
  const int64_t h = item - j * H;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t query_end = residual_query_end(table, blocked, token_segment[j]);

  acc_t kr[NPL], vr[NPL], acc_k[NPL], acc_v[NPL];
  load_row<NPL>(k + j * rs.k + h * D, D, lane, kr);
  load_row<NPL>(v + j * rs.v + h * D, D, lane, vr);
#pragma unroll
  for (int i = 0; i < NPL; ++i) acc_k[i] = acc_v[i] = 0;

  for (int64_t t = j + warp; t < query_end; t += kSplit) {
    const int64_t qi = t * H + h;
    acc_t qr[NPL], gr[NPL];
    load_row<NPL>(q + t * rs.q + h * D, D, lane, qr);
    load_row<NPL>(grad_out + qi * D, D, lane, gr);
    acc_t s = 0, dp = 0;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      s += qr[i] * kr[i];
      dp += gr[i] * vr[i];
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
      s += __shfl_xor_sync(kFullMask, s, offset);
      dp += __shfl_xor_sync(kFullMask, dp, offset);
    }
    const acc_t p = dev_exp(s * scale - lse[qi]);
    const acc_t ds = p * (dp - delta[qi]) * scale;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      acc_v[i] += p * gr[i];
      acc_k[i] += ds * qr[i];
    }
  }

#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    s_dk[warp][lane + kWarpSize * i] = acc_k[i];
    s_dv[warp][lane + kWarpSize * i] = acc_v[i];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kRowElems && e < D; e += blockDim.x) {
    acc_t sk = 0, sv = 0;
#pragma unroll
    for (int w = 0; w < kSplit; ++w) {
      sk += s_dk[w][e];
      sv += s_dv[w][e];
    }
    dk[item * D + e] = sk;
    dv[item * D + e] = sv;
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Calls f(std::integral_constant<int, NPL>) with the smallest elements-per-
// lane count that covers D.
template <typename F>
void dispatch_elems_per_lane(int64_t D, F&& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 1>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// What the kernels' launch shapes allow, beyond the checks shared with the
// CPU op (../checks.h).
void check_cuda_limits(const at::Tensor& q) {
  check_at_most(q.size(0) * q.size(1), std::numeric_limits<int32_t>::max(),
                "hipro_fast.tree_attention (CUDA): T * H (one 1-D grid)");
  check_at_most(q.size(2), kMaxHeadDim, "hipro_fast.tree_attention (CUDA): head dim");
}

// The cached plan, kept for the process's life when a CUDA graph is being
// captured on this stream: every replay reads its device tensors, even after
// the cache has evicted its entry and dropped its own reference.
std::shared_ptr<const AttentionBlockPlan> graph_safe_plan(const at::Tensor& segment_table,
                                                          int64_t num_tokens) {
  auto plan = attention_block_plan(segment_table, num_tokens, attention_block_min_pairs());
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    retain_plan_for_graph_replay(plan);
  }
  return plan;
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v,
                                                       const at::Tensor& segment_table,
                                                       const at::Tensor& token_segment,
                                                       double scale) {
  // Computes in its documented precision even inside an autocast region: the
  // block GEMMs (attention_blocks.cpp) must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_attention_args(q, k, v, segment_table, token_segment);
  check_cuda_limits(q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const auto acc_type = acc_scalar_type(q.scalar_type());
  if (T == 0 || H == 0) {
    return {at::empty({T, H, D}, q.options()), at::empty({T, H}, q.options().dtype(acc_type))};
  }
  const auto plan = graph_safe_plan(segment_table, T);
  // Residual kernel first (it writes every row), then the blocks merge in.
  auto o = at::empty({T, H, D}, q.options().dtype(acc_type));
  auto m = at::empty({T, H}, q.options().dtype(acc_type));
  auto l = at::empty({T, H}, q.options().dtype(acc_type));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch_validate(segment_table, token_segment, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "tree_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_elems_per_lane(D, [&](auto npl) {
      constexpr int NPL = decltype(npl)::value;
      tree_attention_fwd_kernel<scalar_t, NPL><<<static_cast<unsigned>(T), kAttnThreads, 0,
                                                 stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          o.data_ptr<acc_t>(), m.data_ptr<acc_t>(), l.data_ptr<acc_t>(),
          segment_table.data_ptr<int64_t>(), token_segment.data_ptr<int64_t>(),
          plan->blocked_flags.data_ptr<uint8_t>(), H, D, row_strides(q, k, v),
          static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  attention_blocks_forward(*plan, q, k, v, scale, o, m, l);
  return attention_finalize(o, m, l, q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& segment_table,
    const at::Tensor& token_segment, double scale) {
  // Computes in its documented precision even inside an autocast region: the
  // block GEMMs (attention_blocks.cpp) must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_attention_backward_args(grad_out, q, k, v, out, lse, segment_table, token_segment);
  check_cuda_limits(q);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const c10::cuda::CUDAGuard guard(q.device());
  if (T == 0 || H == 0) {
    return {at::empty({T, H, D}, q.options()), at::empty({T, H, D}, q.options()),
            at::empty({T, H, D}, q.options())};
  }
  const auto plan = graph_safe_plan(segment_table, T);
  // Same conversions as the CPU op: dO and O in q's dtype, lse in acc type.
  const auto go = grad_out.contiguous().to(q.scalar_type());
  const auto o = out.contiguous().to(q.scalar_type());
  const auto acc_type = acc_scalar_type(q.scalar_type());
  const auto lse_c = lse.contiguous().to(acc_type);
  // The residual kernels write every row of dq, dk, dv; the blocks add to them.
  auto dq = at::empty({T, H, D}, q.options().dtype(acc_type));
  auto dk = at::empty({T, H, D}, q.options().dtype(acc_type));
  auto dv = at::empty({T, H, D}, q.options().dtype(acc_type));
  auto delta = at::empty({T, H}, q.options().dtype(acc_type));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch_validate(segment_table, token_segment, stream);
  const uint8_t* blocked = plan->blocked_flags.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "tree_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t sc = static_cast<acc_t>(scale);
    {
      constexpr int threads = 256;
      constexpr int rows_per_block = threads / kWarpSize;
      const int64_t rows = T * H;
      attention_delta_kernel<scalar_t>
          <<<static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), threads, 0,
             stream>>>(go.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                       delta.data_ptr<acc_t>(), rows, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dispatch_elems_per_lane(D, [&](auto npl) {
      constexpr int NPL = decltype(npl)::value;
      tree_attention_dq_kernel<scalar_t, NPL><<<static_cast<unsigned>(T), kAttnThreads, 0,
                                                stream>>>(
          go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
          v.data_ptr<scalar_t>(), lse_c.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
          dq.data_ptr<acc_t>(), segment_table.data_ptr<int64_t>(),
          token_segment.data_ptr<int64_t>(), blocked, H, D, row_strides(q, k, v), sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      tree_attention_dkdv_kernel<scalar_t, NPL><<<static_cast<unsigned>(T * H),
                                                  kSplit * kWarpSize, 0, stream>>>(
          go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
          v.data_ptr<scalar_t>(), lse_c.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
          dk.data_ptr<acc_t>(), dv.data_ptr<acc_t>(), segment_table.data_ptr<int64_t>(),
          token_segment.data_ptr<int64_t>(), blocked, H, D, row_strides(q, k, v), sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  attention_blocks_backward(*plan, q, k, v, go, lse_c, delta, scale, dq, dk, dv);
  const auto st = q.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(hipro_fast, CUDA, m) {
  m.impl("tree_attention", &cuda::tree_attention_cuda);
  m.impl("tree_attention_backward", &cuda::tree_attention_backward_cuda);
}

}  // namespace hipro
