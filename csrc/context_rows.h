// Which packed tokens read each context row: the one structure both backends'
// forest-assembly backward walks, so the context gradient is a gather in a
// fixed order (no atomics) and the CPU tests cover the logic the CUDA kernel
// runs.
//
//   grad_ctx[r, w] = sum over j in [row_start[r], row_start[r + 1]) of
//                    grad_out[token_order[j], w], accumulated in j order
//
// token_order is a stable sort of the tokens by their ctx row, so each row's
// tokens come in ascending token order: both devices add the same values in
// the same order and give bitwise identical gradients, run after run.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "tree_index.h"

namespace hipro {

struct ContextRowTokens {
  at::Tensor sorted_rows;  // int64 [T]: token_ctx_row sorted (negative = no context, first)
  at::Tensor token_order;  // int64 [T]: the tokens in that order (stable: ascending within a row)
  at::Tensor row_start;    // int64 [R + 1]: row r's tokens are token_order[row_start[r]:row_start[r + 1]]
};

// Pure ATen (a stable sort and a searchsorted), so the same call runs on either
// device without a host sync. Rows >= num_ctx_rows fall past row_start[R] and are
// read by no row: the caller checks them (the CPU op on the host, the CUDA kernel
// with a device assertion on the largest, sorted_rows[T - 1]).
ContextRowTokens context_row_tokens(const at::Tensor& token_ctx_row, int64_t num_ctx_rows);

// Columns [w0, w1) of context row r's gradient into acc[0, w1 - w0): the row's
// tokens in the order above, summed in acc_t from zero. The CUDA kernel calls
// it per element (w1 = w0 + 1, acc a register), the CPU loop per row (acc a
// [W] buffer, the inner loop over columns contiguous); each element's sum is
// the same sequence of additions either way.
template <typename acc_t, typename scalar_t>
HIPRO_HD void context_row_grad(const scalar_t* grad_out, const int64_t* token_order,
                               const int64_t* row_start, int64_t r, int64_t W, int64_t w0,
                               int64_t w1, acc_t* acc) {
  for (int64_t w = w0; w < w1; ++w) acc[w - w0] = acc_t(0);
  for (int64_t j = row_start[r]; j < row_start[r + 1]; ++j) {
    const scalar_t* grad_row = grad_out + token_order[j] * W;
    for (int64_t w = w0; w < w1; ++w) acc[w - w0] += static_cast<acc_t>(grad_row[w]);
  }
}

}  // namespace hipro
