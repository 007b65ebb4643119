// Device helpers shared by the hipro_fast CUDA kernels: warp/block
// reductions with a fixed summation order (so every kernel is deterministic
// run to run), exp/log/sqrt overloads for the accumulation types and launch
// sizing. The host-side argument checks are in ../checks.h (shared with the
// CPU ops, compiled by the host compiler), the accumulation dtype in
// ../acc_type.h.
#pragma once

// Stream and device guard come from c10/cuda directly rather than through
// <ATen/cuda/CUDAContext.h>: that header pulls in the cuBLAS / cuSPARSE /
// cuSOLVER headers, which minimal CUDA toolkits (e.g. the compile-only one in
// the dev container) lack, and these kernels need none of them.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../acc_type.h"
#include "../checks.h"
#include "../tree_index.h"

namespace hipro {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the 32 lanes of a warp. Butterfly (xor) exchange: every lane ends
// with the bit-identical total (IEEE addition is commutative), which keeps
// data-dependent branches on the result warp-uniform.
template <typename T>
__device__ __forceinline__ T warp_allreduce_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// Sum over a block whose size is a multiple of 32 (at most 1024); every
// thread gets the total. `scratch` is shared memory of at least 33 elements.
// Must be called by all threads of the block. Fixed order: deterministic.
template <typename T>
__device__ __forceinline__ T block_allreduce_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_allreduce_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T s = lane < num_warps ? scratch[lane] : T(0);
    s = warp_allreduce_sum(s);
    if (lane == 0) scratch[kWarpSize] = s;
  }
  __syncthreads();
  return scratch[kWarpSize];
}

__device__ __forceinline__ float dev_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float dev_log(float x) { return ::logf(x); }
__device__ __forceinline__ double dev_log(double x) { return ::log(x); }
__device__ __forceinline__ float dev_sqrt(float x) { return ::sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return ::sqrt(x); }

template <typename T>
__device__ __forceinline__ T neg_infinity() {
  return -static_cast<T>(INFINITY);
}

// Blocks for a grid-stride elementwise loop over n items.
inline unsigned elementwise_blocks(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20)));
}

}  // namespace cuda
}  // namespace hipro
