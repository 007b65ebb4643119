// The CPU operators through the dispatcher (as Python calls them), against
// straightforward libtorch computations.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

#include "check.h"
#include "forest_layout.h"
#include "tree_index.h"

using namespace hipro;

static at::Tensor long_tensor(const std::vector<int64_t>& v) {
  return at::tensor(v, at::kLong);
}

int main() {
  // Forest: root(3) -> a(2) -> c(1); root -> b(4)
  ForestLayout L = build_forest_layout({-1, 0, 0, 1}, {{0, 1, 2}, {3, 4}, {5, 6, 7, 8}, {9}}, 77);
  const int64_t T = static_cast<int64_t>(L.token_segment.size());
  auto table = long_tensor(L.segment_table).view({-1, kSegCols});
  auto tseg = long_tensor(L.token_segment);
  at::manual_seed(0);
  const int64_t H = 2, D = 5;
  auto q = at::randn({T, H, D}, at::kDouble), k = at::randn({T, H, D}, at::kDouble),
       v = at::randn({T, H, D}, at::kDouble);
  const double scale = 0.4;

  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("hipro_fast::tree_attention", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, double)>();
  auto [out, lse] = op.call(q, k, v, table, tseg, scale);

  // Dense reference: mask from the DFS-preorder rule k <= q < subtree_end(seg(k)).
  auto mask = at::zeros({T, T}, at::kBool);
  for (int64_t qi = 0; qi < T; ++qi)
    for (int64_t ki = 0; ki <= qi; ++ki)
      if (qi < seg_subtree_end(L.segment_table.data(), L.token_segment[ki])) mask[qi][ki] = true;
  auto scores = at::einsum("qhd,khd->hqk", {q, k}) * scale;
  scores = scores.masked_fill(mask.logical_not().unsqueeze(0), -INFINITY);
  auto expected = at::einsum("hqk,khd->qhd", {scores.softmax(-1), v});
  EXPECT((out - expected).abs().max().item<double>() < 1e-12);
  EXPECT((lse - scores.logsumexp(-1).t()).abs().max().item<double>() < 1e-12);

  // Assembly: context rows and positional rows.
  auto ctx = at::randn({10, 4}, at::kFloat);
  auto emb = at::randn({3, 4}, at::kFloat);
  auto pos = at::randn({8, 4}, at::kFloat);
  auto assemble = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("hipro_fast::assemble_forest", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto x = assemble.call(ctx, emb, pos, long_tensor(L.token_ctx_row), long_tensor(L.token_vocab_id),
                         long_tensor(L.token_position));
  auto x_ref = ctx.index_select(0, long_tensor(L.token_ctx_row)) +
               pos.index_select(0, long_tensor(L.token_position));
  EXPECT((x - x_ref).abs().max().item<float>() == 0.0f);
  TEST_MAIN_END();
}
