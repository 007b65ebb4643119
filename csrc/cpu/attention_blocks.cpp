// Batched-GEMM blocks of the CPU tree attention; see attention_blocks.h.
#include "attention_blocks.h"

#include <atomic>

#include "../checks.h"
#include "../tree_index.h"

namespace hipro {
namespace {

std::atomic<int64_t> g_block_min_pairs{256};

struct Block {
  int64_t key_begin, keys, row_begin, rows;
};

Block block_of(const int64_t* table, int64_t s) {
  const int64_t off = seg_offset(table, s), len = seg_length(table, s);
  return {off, len, off + len, seg_subtree_end(table, s) - (off + len)};
}

// [H, n, D] view of rows [begin, begin + n) of a [T, H, D] tensor.
at::Tensor heads_first(const at::Tensor& x, int64_t begin, int64_t n) {
  return x.narrow(0, begin, n).transpose(0, 1);
}

}  // namespace

int64_t attention_block_min_pairs() { return g_block_min_pairs.load(); }

void set_attention_block_min_pairs(int64_t min_pairs) {
  TORCH_CHECK(min_pairs >= 0, cat("min_pairs must be >= 0, got ", min_pairs));
  g_block_min_pairs.store(min_pairs);
}

AttentionBlockPlan plan_attention_blocks(const at::Tensor& segment_table, int64_t min_pairs) {
  const int64_t S = segment_table.size(0);
  const int64_t* table = segment_table.data_ptr<int64_t>();
  AttentionBlockPlan plan;
  plan.blocked.assign(static_cast<size_t>(S), 0);
  for (int64_t s = 0; s < S; ++s) {
    const Block b = block_of(table, s);
    if (b.rows > 0 && b.rows * b.keys >= min_pairs) {
      plan.blocked[static_cast<size_t>(s)] = 1;
      plan.segments.push_back(s);
    }
  }
  return plan;
}

void attention_blocks_forward(const AttentionBlockPlan& plan, const at::Tensor& segment_table,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              double scale, at::Tensor& o, at::Tensor& m, at::Tensor& l) {
  const int64_t* table = segment_table.data_ptr<int64_t>();
  for (const int64_t s : plan.segments) {
    const Block b = block_of(table, s);
    const auto qr = heads_first(q, b.row_begin, b.rows);   // [H, n, D]
    const auto ks = heads_first(k, b.key_begin, b.keys);   // [H, L, D]
    const auto vs = heads_first(v, b.key_begin, b.keys);
    const auto scores = at::bmm(qr, ks.transpose(1, 2)).mul_(scale);  // [H, n, L]
    const auto block_max = std::get<0>(scores.max(2));                // [H, n]
    const auto p = (scores - block_max.unsqueeze(2)).exp_();
    auto block_sum = p.sum(2);
    auto block_out = at::bmm(p, vs);                                   // [H, n, D]
    // Log-sum-exp merge into the rows' running statistics (views write through).
    auto mr = heads_first(m, b.row_begin, b.rows);
    auto lr = heads_first(l, b.row_begin, b.rows);
    auto orow = heads_first(o, b.row_begin, b.rows);
    const auto new_max = at::maximum(mr, block_max);
    const auto keep = (mr - new_max).exp_();
    const auto take = (block_max - new_max).exp_();
    orow.mul_(keep.unsqueeze(2)).add_(block_out.mul_(take.unsqueeze(2)));
    lr.mul_(keep).add_(block_sum.mul_(take));
    mr.copy_(new_max);
  }
}

void attention_blocks_backward(const AttentionBlockPlan& plan, const at::Tensor& segment_table,
                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& grad_out, const at::Tensor& lse,
                               const at::Tensor& delta, double scale, at::Tensor& dq,
                               at::Tensor& dk, at::Tensor& dv) {
  const int64_t* table = segment_table.data_ptr<int64_t>();
  for (const int64_t s : plan.segments) {
    const Block b = block_of(table, s);
    const auto qr = heads_first(q, b.row_begin, b.rows);           // [H, n, D]
    const auto gr = heads_first(grad_out, b.row_begin, b.rows);    // [H, n, D]
    const auto ks = heads_first(k, b.key_begin, b.keys);           // [H, L, D]
    const auto vs = heads_first(v, b.key_begin, b.keys);
    const auto lse_r = heads_first(lse, b.row_begin, b.rows);      // [H, n]
    const auto delta_r = heads_first(delta, b.row_begin, b.rows);
    const auto p = at::bmm(qr, ks.transpose(1, 2)).mul_(scale).sub_(lse_r.unsqueeze(2)).exp_();
    heads_first(dv, b.key_begin, b.keys).add_(at::bmm(p.transpose(1, 2), gr));
    const auto dp = at::bmm(gr, vs.transpose(1, 2));              // [H, n, L]
    const auto ds = dp.sub_(delta_r.unsqueeze(2)).mul_(p).mul_(scale);
    heads_first(dq, b.row_begin, b.rows).add_(at::bmm(ds, ks));
    heads_first(dk, b.key_begin, b.keys).add_(at::bmm(ds.transpose(1, 2), qr));
  }
}

}  // namespace hipro
