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

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3, "q must be [T, H, D], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "q, k, v must be contiguous");
}

}  // namespace hipro
