// Forest assembly on the CPU: one packed [T, W] buffer from context rows,
// frozen token embeddings and positional embeddings.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../tree_index.h"

namespace hipro {
namespace {

at::Tensor assemble_forest_cpu(const at::Tensor& ctx_table, const at::Tensor& token_embedding,
                               const at::Tensor& positional_embedding,
                               const at::Tensor& token_ctx_row, const at::Tensor& token_vocab_id,
                               const at::Tensor& token_position) {
  const int64_t T = token_ctx_row.numel();
  const int64_t W = ctx_table.size(1);
  check_index_vector(token_ctx_row, "token_ctx_row", -1);
  check_index_vector(token_vocab_id, "token_vocab_id", T);
  check_index_vector(token_position, "token_position", T);
  TORCH_CHECK(ctx_table.dim() == 2 && token_embedding.dim() == 2 &&
                  positional_embedding.dim() == 2,
              "ctx_table, token_embedding, positional_embedding must be 2-D");
  TORCH_CHECK(token_embedding.size(1) == W && positional_embedding.size(1) == W,
              "width mismatch: ctx_table ", ctx_table.sizes(), ", token_embedding ",
              token_embedding.sizes(), ", positional_embedding ", positional_embedding.sizes());
  TORCH_CHECK(token_embedding.scalar_type() == ctx_table.scalar_type() &&
                  positional_embedding.scalar_type() == ctx_table.scalar_type(),
              "ctx_table, token_embedding and positional_embedding must share a dtype");
  const auto ctx = ctx_table.contiguous();
  const auto emb = token_embedding.contiguous();
  const auto pos = positional_embedding.contiguous();
  auto out = at::empty({T, W}, ctx_table.options());
  const int64_t* crow = token_ctx_row.data_ptr<int64_t>();
  const int64_t* vid = token_vocab_id.data_ptr<int64_t>();
  const int64_t* tpos = token_position.data_ptr<int64_t>();
  const int64_t R = ctx.size(0), V = emb.size(0), L = pos.size(0);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(token_reads_context(crow[t]) ? crow[t] < R : (vid[t] >= 0 && vid[t] < V),
                "token ", t, " has an out-of-range source (ctx_row ", crow[t], ", vocab_id ",
                vid[t], ")");
    TORCH_CHECK(tpos[t] >= 0 && tpos[t] < L, "token ", t, " has position ", tpos[t],
                " outside the positional table of ", L, " rows");
  }
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
  check_index_vector(token_ctx_row, "token_ctx_row", grad_out.size(0));
  TORCH_CHECK(grad_out.dim() == 2, "grad_out must be [T, W]");
  const int64_t T = grad_out.size(0), W = grad_out.size(1);
  const auto g = grad_out.contiguous();
  auto acc = at::zeros({num_ctx_rows, W}, grad_out.options().dtype(
      grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  const int64_t* crow = token_ctx_row.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(crow[t] < num_ctx_rows, "token ", t, " reads ctx row ", crow[t], " >= ",
                num_ctx_rows);
  }
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
