// Forest assembly on the CPU: one packed [T, W] buffer from context rows,
// frozen token embeddings and positional embeddings.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../acc_type.h"
#include "../checks.h"
#include "../context_rows.h"
#include "../tree_index.h"

namespace hipro {
namespace {

at::Tensor assemble_forest_cpu(const at::Tensor& ctx_table, const at::Tensor& token_embedding,
                               const at::Tensor& positional_embedding,
                               const at::Tensor& token_ctx_row, const at::Tensor& token_vocab_id,
                               const at::Tensor& token_position) {
  check_assemble_args(ctx_table, token_embedding, positional_embedding, token_ctx_row,
                      token_vocab_id, token_position);
  const int64_t T = token_ctx_row.numel();
  const int64_t W = ctx_table.size(1);
  const auto ctx = ctx_table.contiguous();
  const auto emb = token_embedding.contiguous();
  const auto pos = positional_embedding.contiguous();
  // The loops read the index vectors densely: a strided view gets a copy.
  const auto crow_c = token_ctx_row.contiguous();
  const auto vid_c = token_vocab_id.contiguous();
  const auto tpos_c = token_position.contiguous();
  check_assemble_values(crow_c, vid_c, tpos_c, ctx.size(0), emb.size(0), pos.size(0));
  auto out = at::empty({T, W}, ctx_table.options());
  const int64_t* crow = crow_c.data_ptr<int64_t>();
  const int64_t* vid = vid_c.data_ptr<int64_t>();
  const int64_t* tpos = tpos_c.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ctx.scalar_type(), "assemble_forest_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* c = ctx.data_ptr<scalar_t>();
    const scalar_t* e = emb.data_ptr<scalar_t>();
    const scalar_t* p = pos.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* src = token_reads_context(crow[t]) ? c + crow[t] * W : e + vid[t] * W;
        const scalar_t* pe = p + tpos[t] * W;
        scalar_t* dst = o + t * W;
        for (int64_t w = 0; w < W; ++w) {
          dst[w] = static_cast<scalar_t>(static_cast<acc_t>(src[w]) + static_cast<acc_t>(pe[w]));
        }
      }
    });
  });
  return out;
}

at::Tensor assemble_forest_backward_cpu(const at::Tensor& grad_out, const at::Tensor& token_ctx_row,
                                        int64_t num_ctx_rows) {
  check_assemble_backward_args(grad_out, token_ctx_row, num_ctx_rows);
  const int64_t W = grad_out.size(1);
  const auto g = grad_out.contiguous();
  check_ctx_rows(token_ctx_row.contiguous(), num_ctx_rows);
  // The CUDA op walks the same token lists with the same summation
  // (context_rows.h), so the two devices agree bit for bit.
  const ContextRowTokens rows = context_row_tokens(token_ctx_row, num_ctx_rows);
  auto grad_ctx = at::empty({num_ctx_rows, W}, grad_out.options());
  const int64_t* order = rows.token_order.data_ptr<int64_t>();
  const int64_t* start = rows.row_start.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "assemble_forest_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* out = grad_ctx.data_ptr<scalar_t>();
    // Each output element is one sum in a fixed order: deterministic whatever
    // the thread count.
    at::parallel_for(0, num_ctx_rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(W, 1)),
                     [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(W);
      for (int64_t r = r0; r < r1; ++r) {
        context_row_grad<acc_t>(gp, order, start, r, W, 0, W, acc.data());
        for (int64_t w = 0; w < W; ++w) out[r * W + w] = static_cast<scalar_t>(acc[w]);
      }
    });
  });
  return grad_ctx;
}

}  // namespace

TORCH_LIBRARY_IMPL(hipro_fast, CPU, m) {
  m.impl("assemble_forest", &assemble_forest_cpu);
  m.impl("assemble_forest_backward", &assemble_forest_backward_cpu);
}

}  // namespace hipro
