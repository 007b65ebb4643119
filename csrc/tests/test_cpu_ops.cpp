// The CPU operators through the dispatcher (as Python calls them), against
// references that share no code with them:
//   * tree attention's reference mask comes from the definition, on the
//     *input* forest (parents and token lists, before packing): query q sees
//     key k iff k's segment is an ancestor-or-self of q's segment and, within
//     one segment, k comes no later than q. Every token reads its own context
//     row, so a packed token is mapped back to its input segment and place
//     through token_ctx_row, not through the segment table or tree_index.h.
//   * the backward is compared with libtorch autograd through that dense
//     fp64 reference;
//   * both run with the GEMM blocks on every segment (one block at a time,
//     and grouped as on CUDA), the default split and the scalar loops only;
//   * malformed segment tables and token_segment vectors raise, naming the
//     culprit, in the forward and the backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "attention_blocks.h"
#include "forest_layout.h"
#include "tree_index.h"

using namespace hipro;

namespace {

at::Tensor long_tensor(const std::vector<int64_t>& v) { return at::tensor(v, at::kLong); }

void expect_close(const at::Tensor& a, const at::Tensor& b, double tol, const std::string& what) {
  const double err = (a - b).abs().max().item<double>();
  if (!(err <= tol)) {
    std::fprintf(stderr, "%s: max error %g > %g\n", what.c_str(), err, tol);
    ++g_failures;
  }
}

template <typename F>
void expect_error(F&& call, const std::string& needle, const std::string& what) {
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(needle) == std::string::npos) {
      std::fprintf(stderr, "%s: expected \"%s\" in the error, got: %s\n", what.c_str(),
                   needle.c_str(), msg.c_str());
      ++g_failures;
    }
    return;
  }
  std::fprintf(stderr, "%s: no error, expected \"%s\"\n", what.c_str(), needle.c_str());
  ++g_failures;
}

using AttentionFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, double);
using AttentionBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double);

c10::TypedOperatorHandle<AttentionFn> attention_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("hipro_fast::tree_attention", "")
      .typed<AttentionFn>();
}

c10::TypedOperatorHandle<AttentionBackwardFn> attention_backward_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("hipro_fast::tree_attention_backward", "")
      .typed<AttentionBackwardFn>();
}

// A packed forest and its reference mask from the definition.
struct Case {
  ForestLayout layout;
  at::Tensor table, token_segment;
  at::Tensor mask;  // [T, T] bool: query (row) sees key (column)
  int64_t T;
};

bool is_ancestor_or_self(const std::vector<int64_t>& parents, int64_t a, int64_t s) {
  for (int64_t x = s; x >= 0; x = parents[static_cast<size_t>(x)]) {
    if (x == a) return true;
  }
  return false;
}

// Input segment i has lengths[i] tokens and parent parents[i] (-1: a root).
Case make_case(const std::vector<int64_t>& parents, const std::vector<int64_t>& lengths) {
  std::vector<std::vector<int64_t>> sources(parents.size());
  std::vector<int64_t> row_segment, row_place;  // per context row: input segment, place in it
  for (size_t i = 0; i < parents.size(); ++i) {
    for (int64_t j = 0; j < lengths[i]; ++j) {
      sources[i].push_back(static_cast<int64_t>(row_segment.size()));
      row_segment.push_back(static_cast<int64_t>(i));
      row_place.push_back(j);
    }
  }
  Case c;
  c.layout = build_forest_layout(parents, sources, 1 << 20);
  c.T = static_cast<int64_t>(c.layout.token_segment.size());
  EXPECT(c.T == static_cast<int64_t>(row_segment.size()));
  c.table = long_tensor(c.layout.segment_table).view({-1, kSegCols});
  c.token_segment = long_tensor(c.layout.token_segment);
  std::vector<int64_t> seg(static_cast<size_t>(c.T)), place(static_cast<size_t>(c.T));
  for (int64_t t = 0; t < c.T; ++t) {
    const int64_t row = c.layout.token_ctx_row[static_cast<size_t>(t)];
    EXPECT(row >= 0 && row < c.T);
    seg[static_cast<size_t>(t)] = row_segment[static_cast<size_t>(row)];
    place[static_cast<size_t>(t)] = row_place[static_cast<size_t>(row)];
  }
  c.mask = at::zeros({c.T, c.T}, at::kBool);
  auto m = c.mask.accessor<bool, 2>();
  for (int64_t q = 0; q < c.T; ++q) {
    for (int64_t k = 0; k < c.T; ++k) {
      const int64_t qs = seg[static_cast<size_t>(q)], ks = seg[static_cast<size_t>(k)];
      m[q][k] = is_ancestor_or_self(parents, ks, qs) &&
                (ks != qs || place[static_cast<size_t>(k)] <= place[static_cast<size_t>(q)]);
    }
  }
  return c;
}

// Dense masked attention, differentiable: out [T, H, D], lse [T, H].
std::tuple<at::Tensor, at::Tensor> dense_attention(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& mask,
                                                   double scale) {
  auto scores = at::einsum("qhd,khd->hqk", {q, k}) * scale;
  scores = scores.masked_fill(mask.logical_not().unsqueeze(0), -INFINITY);
  auto out = at::einsum("hqk,khd->qhd", {scores.softmax(-1), v});
  return {out, scores.logsumexp(-1).t()};
}

void check_attention(const Case& c, int64_t H, int64_t D, const std::string& what) {
  const double scale = 0.4;
  auto q = at::randn({c.T, H, D}, at::kDouble), k = at::randn({c.T, H, D}, at::kDouble),
       v = at::randn({c.T, H, D}, at::kDouble), go = at::randn({c.T, H, D}, at::kDouble);
  // Forward and backward of the reference, through libtorch autograd.
  auto qr = q.clone(), kr = k.clone(), vr = v.clone();
  for (auto* leaf : {&qr, &kr, &vr}) leaf->set_requires_grad(true);
  auto [out_ref, lse_ref] = dense_attention(qr, kr, vr, c.mask, scale);
  const auto grads = torch::autograd::grad({out_ref}, {qr, kr, vr}, {go});

  const int64_t before = attention_block_min_pairs();
  const BlockGrouping grouping_before = attention_block_grouping();
  const std::vector<std::tuple<const char*, int64_t, BlockGrouping>> modes = {
      {"all GEMM", 0, BlockGrouping::kNever},
      {"all GEMM, grouped", 0, BlockGrouping::kAlways},
      {"default", before, grouping_before},
      {"scalar only", int64_t{1} << 60, grouping_before}};
  for (const auto& [mode, pairs, grouping] : modes) {
    set_attention_block_min_pairs(pairs);
    set_attention_block_grouping(grouping);
    const std::string where = what + " (" + mode + ")";
    auto [out, lse] = attention_op().call(q, k, v, c.table, c.token_segment, scale);
    expect_close(out, out_ref.detach(), 1e-12, where + " out");
    expect_close(lse, lse_ref.detach(), 1e-12, where + " lse");
    auto [dq, dk, dv] =
        attention_backward_op().call(go, q, k, v, out, lse, c.table, c.token_segment, scale);
    expect_close(dq, grads[0], 1e-11, where + " dq");
    expect_close(dk, grads[1], 1e-11, where + " dk");
    expect_close(dv, grads[2], 1e-11, where + " dv");
  }
  set_attention_block_min_pairs(before);
  set_attention_block_grouping(grouping_before);
}

// Each corruption of a valid forest raises in the forward and the backward.
void check_rejects_malformed_forests() {
  // Packed: root(3) = segment 0, a(2) = 1, its child c(1) = 2, b(4) = 3.
  const Case c = make_case({-1, 0, 0, 1}, {3, 2, 4, 1});
  EXPECT(c.layout.packed_to_input == std::vector<int64_t>({0, 1, 3, 2}));
  const int64_t T = c.T;  // 10
  auto q = at::randn({T, 1, 4}, at::kDouble);
  const auto forward = attention_op().call(q, q, q, c.table, c.token_segment, 1.0);
  const at::Tensor& out = std::get<0>(forward);
  const at::Tensor& lse = std::get<1>(forward);

  struct Corruption {
    const char* what;
    int64_t row, col, value;  // segment_table[row, col] = value (row < 0: token_segment[col])
    std::string needle;
  };
  const std::vector<Corruption> corruptions = {
      {"parent later in preorder", 1, kColParent, 3,
       "segment 1 has parent 3 which is not earlier in DFS preorder"},
      {"parent is itself", 2, kColParent, 2,
       "segment 2 has parent 2 which is not earlier in DFS preorder"},
      {"subtree past the end", 0, kColSubtreeEnd, T + 1,
       "segment 0 subtree ends past token " + std::to_string(T)},
      {"tokens past the end", 3, kColLength, 5, "segment 3 (offset 6, length 5) does not lie"},
      {"negative offset", 1, kColOffset, -1, "segment 1 (offset -1, length 2) does not lie"},
      {"token in a valid but wrong segment", -1, 4, 3, "token 4 lies outside its segment 3"},
      {"token names no segment", -1, 0, 99, "token 0 names segment 99 outside [0, 4)"},
      {"token names a negative segment", -1, 9, -1, "token 9 names segment -1"},
  };
  for (const auto& bad : corruptions) {
    auto table = c.table.clone();
    auto tseg = c.token_segment.clone();
    if (bad.row >= 0) {
      table[bad.row][bad.col] = bad.value;
    } else {
      tseg[bad.col] = bad.value;
    }
    expect_error([&] { attention_op().call(q, q, q, table, tseg, 1.0); }, bad.needle,
                 std::string("forward, ") + bad.what);
    expect_error(
        [&] { attention_backward_op().call(q, q, q, q, out, lse, table, tseg, 1.0); },
        bad.needle, std::string("backward, ") + bad.what);
  }
}

// The plan groups same-depth blocks with equal key counts (padding the
// smaller to the larger's rows when it has at least half of them); the op
// through such groups equals the dense reference (check_attention).
void check_block_groups() {
  // root(3) -> a(2) -> a1, a2, a3 (1 each); root -> b(2) -> b1, b2 (1 each);
  // root -> c(4) -> c1(1): a and b share a padded group, c (other keys) not.
  const Case c = make_case({-1, 0, 1, 1, 1, 0, 5, 5, 0, 8}, {3, 2, 1, 1, 1, 2, 1, 1, 4, 1});
  const auto plan = plan_attention_blocks(c.table.data_ptr<int64_t>(), c.table.size(0), 0,
                                          at::Device(at::kCPU));
  EXPECT(plan.blocks.size() == 4);  // root, a, b, c
  size_t covered = 0;
  bool padded_pair = false;
  for (const auto& g : plan.groups) {
    covered += g.members.size();
    for (const int64_t i : g.members) {
      EXPECT(plan.blocks[i].keys == g.keys && plan.blocks[i].rows <= g.rows &&
             2 * plan.blocks[i].rows >= g.rows);
    }
    if (g.members.size() == 2) {
      padded_pair = g.keys == 2 && g.rows == 3 && g.pad.defined() &&
                    g.valid_rows.numel() == 5 && g.row_index.numel() == 6;
    }
  }
  EXPECT(covered == plan.blocks.size());
  EXPECT(plan.groups.size() == 3 && padded_pair);
  check_attention(c, 2, 3, "padded block group");
}

void check_plans_kept_for_graph_replay() {
  // Two plans of tables nobody else holds, one retained as a capture would:
  // after enough new tables for the cache to evict both entries, only the
  // retained plan (whose device tensors a replayed graph reads) is alive.
  std::weak_ptr<const AttentionBlockPlan> retained, dropped;
  size_t kept = 0;
  {
    const Case a = make_case({-1, 0, 0}, {3, 2, 2});
    const Case b = make_case({-1, 0}, {4, 1});
    auto plan_a = attention_block_plan(a.table, a.T, 0);
    auto plan_b = attention_block_plan(b.table, b.T, 0);
    kept = retain_plan_for_graph_replay(plan_a);
    EXPECT(retain_plan_for_graph_replay(plan_a) == kept);  // once, however often captured
    retained = plan_a;
    dropped = plan_b;
  }
  for (int i = 0; i < 40; ++i) {  // more than the cache keeps of tables nobody holds
    const Case c = make_case({-1, 0}, {2 + i % 5, 1 + i % 3});
    attention_block_plan(c.table, c.T, 0);
  }
  EXPECT(dropped.expired());
  EXPECT(!retained.expired());
}

void check_assembly() {
  // root(3) -> a(2) -> c(1); root -> b(4), every token a context row.
  const Case c = make_case({-1, 0, 0, 1}, {3, 2, 4, 1});
  auto ctx = at::randn({10, 4}, at::kFloat);
  auto emb = at::randn({3, 4}, at::kFloat);
  auto pos = at::randn({8, 4}, at::kFloat);
  auto assemble = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("hipro_fast::assemble_forest", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  const auto& L = c.layout;
  auto x = assemble.call(ctx, emb, pos, long_tensor(L.token_ctx_row), long_tensor(L.token_vocab_id),
                         long_tensor(L.token_position));
  auto x_ref = ctx.index_select(0, long_tensor(L.token_ctx_row)) +
               pos.index_select(0, long_tensor(L.token_position));
  EXPECT((x - x_ref).abs().max().item<float>() == 0.0f);
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_attention(make_case({-1, 0, 0, 1}, {3, 2, 4, 1}), 2, 5, "fixed forest");
  // Root with a 400-pair block (on the GEMM path at the default split), a
  // second tree, depth 3.
  check_attention(make_case({-1, 0, 0, 1, 1, 2, -1, 6}, {20, 5, 6, 3, 4, 2, 3, 2}), 3, 8,
                  "two trees");
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 30; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 15);
    std::vector<int64_t> parents(n), lengths(n);
    for (int i = 0; i < n; ++i) {
      parents[i] = (i == 0 || rng() % 6 == 0) ? -1 : static_cast<int64_t>(rng() % i);
      lengths[i] = 1 + static_cast<int64_t>(rng() % 6);
    }
    check_attention(make_case(parents, lengths), 1 + static_cast<int64_t>(rng() % 3), 4,
                    "random forest " + std::to_string(trial));
  }
  check_block_groups();
  check_plans_kept_for_graph_replay();
  check_rejects_malformed_forests();
  check_assembly();
  TEST_MAIN_END();
}
