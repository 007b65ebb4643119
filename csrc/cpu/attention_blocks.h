// Tree attention through batched GEMMs for the segments with large subtrees.
//
// In the DFS-preorder layout the queries that see all of segment s are one
// contiguous range, its strict descendants R(s) = [offset(s) + length(s),
// subtree_end(s)). So the pairs (R(s), keys of s) form a dense block: scores
// S = Q[R(s)] K[s]^T for all heads in one bmm, and likewise every backward
// product. The context segments of a HiPro forest (root, group and task
// contexts, ~16 tokens each, seen by hundreds of queries) hold almost all
// visible pairs, so these GEMMs replace most of the per-pair dot products.
// Segments whose block is small stay in the scalar loops; `blocked[s]` tells
// the scalar loops which (segment, descendant) pairs are done here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace hipro {

struct AttentionBlockPlan {
  std::vector<int64_t> segments;  // blocked segments, in preorder
  std::vector<uint8_t> blocked;   // [S]: 1 if segment s is in `segments`
};

// Blocks the segments whose (descendant queries x own keys) count is at least
// `min_pairs` (0 blocks every segment with descendants; a huge value none).
AttentionBlockPlan plan_attention_blocks(const at::Tensor& segment_table, int64_t min_pairs);

// Tuning knob (process-wide; default 256 pairs), exposed to Python as
// hipro_fast.ops.set_attention_block_min_pairs for tests and benchmarks.
int64_t attention_block_min_pairs();
void set_attention_block_min_pairs(int64_t min_pairs);

// Merges each block's softmax statistics into the running (o, m, l) of its
// query rows: o [T, H, D] unnormalised output relative to m, m [T, H] max
// scaled score, l [T, H] sum of exp(score - m); q, k, v [T, H, D] in the
// accumulation dtype (row-strided views are fine).
void attention_blocks_forward(const AttentionBlockPlan& plan, const at::Tensor& segment_table,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              double scale, at::Tensor& o, at::Tensor& m, at::Tensor& l);

// Adds the blocks' contributions to dq, dk, dv [T, H, D] (accumulation dtype);
// lse, delta [T, H] are the forward log-sum-exp and rowsum(dO * O).
void attention_blocks_backward(const AttentionBlockPlan& plan, const at::Tensor& segment_table,
                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& grad_out, const at::Tensor& lse,
                               const at::Tensor& delta, double scale, at::Tensor& dq,
                               at::Tensor& dk, at::Tensor& dv);

}  // namespace hipro
