// Forest assembly on the CPU: one packed [T, W] buffer from context rows,
// frozen token embeddings and positional embeddings.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../acc_type.h"
#include "../checks.h"
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
  const int64_t T = grad_out.size(0), W = grad_out.size(1);
  const auto g = grad_out.contiguous();
  const auto crow_c = token_ctx_row.contiguous();
  check_ctx_rows(crow_c, num_ctx_rows);
  auto acc = at::zeros({num_ctx_rows, W},
                       grad_out.options().dtype(acc_scalar_type(grad_out.scalar_type())));
  const int64_t* crow = crow_c.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "assemble_forest_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    acc_t* ap = acc.data_ptr<acc_t>();
    // Parallel over feature columns: every row is summed in token order, so the
    // result is deterministic whatever the thread count.
    at::parallel_for(0, W, 64, [&](int64_t w0, int64_t w1) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = crow[t];
        if (!token_reads_context(r)) continue;
        for (int64_t w = w0; w < w1; ++w) ap[r * W + w] += static_cast<acc_t>(gp[t * W + w]);
      }
    });
  });
  return acc.to(grad_out.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(hipro_fast, CPU, m) {
  m.impl("assemble_forest", &assemble_forest_cpu);
  m.impl("assemble_forest_backward", &assemble_forest_backward_cpu);
}

}  // namespace hipro
