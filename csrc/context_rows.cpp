// The token lists of the context rows (context_rows.h), built with ATen ops that
// run on the tensor's own device.
#include "context_rows.h"

namespace hipro {

ContextRowTokens context_row_tokens(const at::Tensor& token_ctx_row, int64_t num_ctx_rows) {
  // A stable sort keeps each row's tokens in ascending token order: the
  // summation order the gradient's bits depend on.
  auto [sorted_rows, token_order] =
      at::sort(token_ctx_row, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  // row_start[r] = the first sorted position holding a row >= r, so that the
  // non-context tokens (negative rows) precede row_start[0].
  const auto bounds = at::arange(num_ctx_rows + 1, token_ctx_row.options());
  auto row_start = at::searchsorted(sorted_rows, bounds);
  return {sorted_rows.contiguous(), token_order.contiguous(), row_start.contiguous()};
}

}  // namespace hipro
