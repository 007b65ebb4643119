// Argument checks shared by the CPU and CUDA op implementations.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/ATen.h>

#include "tree_index.h"

namespace hipro {

inline void check_index_vector(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(numel < 0 || t.numel() == numel, name, " must have ", numel, " entries, got ",
              t.numel());
}

inline void check_segment_table(const at::Tensor& table, int64_t num_tokens) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kSegCols,
              "segment_table must be [S, 4] (offset, length, parent, subtree_end), got ",
              table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kLong, "segment_table must be int64");
  TORCH_CHECK(table.is_contiguous(), "segment_table must be contiguous");
  (void)num_tokens;
}

// q, k, v may be row-strided (e.g. slices of a packed [T, 3, H, D] qkv GEMM
// output): only each token's [H, D] block must be contiguous.
inline void check_inner_contiguous(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be [T, H, D], got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, " must be contiguous within a row ([H, D] block), got strides ", x.strides());
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_inner_contiguous(q, "q");
  check_inner_contiguous(k, "k");
  check_inner_contiguous(v, "v");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype");
}

// Shapes of pool_eos's arguments (device and value checks are per backend).
inline void check_pool_shapes(const at::Tensor& x, const at::Tensor& eos_index,
                              const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                              const at::Tensor& projection) {
  TORCH_CHECK(x.dim() == 2, "x must be [T, W], got ", x.sizes());
  check_index_vector(eos_index, "eos_index", -1);
  const int64_t W = x.size(1);
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == W && ln_bias.dim() == 1 &&
                  ln_bias.size(0) == W,
              "ln_weight and ln_bias must be [", W, "]");
  TORCH_CHECK(projection.dim() == 2 && projection.size(0) == W, "projection must be [", W,
              ", E], got ", projection.sizes());
}

}  // namespace hipro
