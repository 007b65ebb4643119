// The segment-block decomposition of tree attention, one code for both
// backends (pure ATen, so the same calls run on the CPU and, through cuBLAS
// on tensor cores, on CUDA).
//
// In the DFS-preorder layout the queries that see all of segment s are one
// contiguous range, its strict descendants R(s) = [offset(s) + length(s),
// subtree_end(s)). So the pairs (R(s), keys of s) form a dense block: scores
// S = Q[R(s)] K[s]^T for all heads in one bmm, and likewise every backward
// product. The context segments of a HiPro forest (root, group and task
// contexts, ~16 tokens each, seen by hundreds of queries) hold almost all
// visible pairs, so these GEMMs replace most of the per-pair dot products.
// Segments whose block is small stay with the backend's per-row kernels (CPU
// loops, CUDA warps), which take only the residual pairs: `blocked[s]` and
// the selection functions of tree_index.h (residual_key_ranges,
// residual_query_end) tell them which pairs are done here.
//
// Both backends run the same sequence:
//   forward:  residual kernel writes (o, m, l) in the accumulation dtype ->
//             attention_blocks_forward merges each block by log-sum-exp, in
//             plan (preorder) order -> attention_finalize.
//   backward: residual kernels write dq, dk, dv (accumulation dtype) ->
//             attention_blocks_backward adds each block, in plan order.
// Fixed order and no atomics, so results are deterministic.
//
// Precision (flash-attention's model): GEMM operands in the inputs' dtype,
// products accumulated and scores, softmax and gradients kept in the
// accumulation dtype (fp32; fp64 for fp64); the probabilities P and, for
// bf16, the score gradients dS are rounded to the inputs' dtype before they
// become GEMM operands. An fp16 dS stays in fp32 (it can pass fp16's 65504
// where dQ and dK do not), so fp16's dQ / dK block GEMMs run in fp32, off the
// tensor cores: fp16 trades that speed for the reference's result; bf16, the
// training default, keeps them. On CUDA half types use bmm with an fp32 result (tensor cores);
// on the CPU the same operands are multiplied in fp32, which is the same
// arithmetic (a product of two bf16/fp16 values is exact in fp32), so the CPU
// tests check the numerics the GPU runs, up to summation order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

namespace hipro {

// One dense block: queries [row_begin, row_begin + rows) x keys [key_begin,
// key_begin + keys) (the keys of `segment`, the queries its descendants).
struct AttentionBlock {
  int64_t segment, key_begin, keys, row_begin, rows;
};

// Blocks computed together: one gather and one bmm per product for all of
// them, instead of a dozen or more launches per block (on CUDA the launches,
// not the FLOPs, would dominate: (L) has 11 blocks per layer). Members are
// segments at one depth (so their query rows are disjoint: same-depth
// subtrees do not nest) with the same number of keys; each is padded to the
// group's largest row count (members have at least half of it). Padded
// positions repeat a real row; the backward zeroes their probabilities and
// the forward drops their outputs.
struct AttentionBlockGroup {
  int64_t depth = 0, keys = 0, rows = 0;  // rows: the largest member's
  std::vector<int64_t> members;           // indices into AttentionBlockPlan::blocks
  // Only for groups of two or more (one block runs on views, no gathers), on
  // the table's device:
  at::Tensor row_index;   // int64 [G * rows]: query row at each padded position
  at::Tensor key_index;   // int64 [G * keys]
  at::Tensor valid_pos;   // int64 [R]: the real positions (undefined: no padding)
  at::Tensor valid_rows;  // int64 [R]: their query rows
  at::Tensor pad;         // bool [G, 1, rows, 1]: true at padded positions (undefined: none)
};

struct AttentionBlockPlan {
  int64_t min_pairs = 0;
  std::vector<AttentionBlock> blocks;       // blocked segments, in preorder
  std::vector<AttentionBlockGroup> groups;  // every block in exactly one; the merge order
  std::vector<uint8_t> blocked;             // [S] host flags: 1 if segment s is blocked
  at::Tensor blocked_flags;                 // uint8 [S], the same flags on the table's device
};

// The plan of a host segment table (int64 [S, 4] row-major, rows valid):
// blocks every segment with segment_blocked(table, s, min_pairs)
// (tree_index.h) and groups the blocks (AttentionBlockGroup).
AttentionBlockPlan plan_attention_blocks(const int64_t* table, int64_t num_segments,
                                         int64_t min_pairs, const at::Device& device,
                                         bool group = true);

// The plan for a segment table on any device, cached. A device table is
// copied to the host once (a device sync) and planned there; later calls with
// the same table (same storage, shape and version counter; the cache keeps a
// reference, so the address cannot be reused by another tensor) reuse the
// plan without touching the device, which also makes the op capturable in a
// CUDA graph after one eager call. A host table is compared by content on a
// hit. Inference tensors have no version counter: they are planned on every
// call. The plan's rows are validated (segment_row_valid) for a forest of
// num_tokens tokens, so a device table is checked on the host too.
std::shared_ptr<const AttentionBlockPlan> attention_block_plan(const at::Tensor& segment_table,
                                                               int64_t num_tokens,
                                                               int64_t min_pairs);

// A CUDA graph captured over the op reads the plan's device tensors (flags,
// group indices) on every replay, long after the op returned, and no graph
// says when it is done: the CUDA ops pass every plan they use during a capture
// here, and it is kept for the life of the process whatever the cache evicts
// (a captured graph is replayed over a handful of forests, so this stays
// small). Returns how many plans are kept so.
size_t retain_plan_for_graph_replay(std::shared_ptr<const AttentionBlockPlan> plan);

// Cache counters (for tests): plans computed and plans reused.
struct AttentionPlanCacheStats {
  int64_t misses = 0, hits = 0;
};
AttentionPlanCacheStats attention_plan_cache_stats();

// Tuning knob (process-wide; default 256 pairs), exposed to Python as
// hipro_fast.ops.set_attention_block_min_pairs for tests and benchmarks. 0
// blocks every segment with descendants; a huge value none.
int64_t attention_block_min_pairs();
void set_attention_block_min_pairs(int64_t min_pairs);

// Whether blocks are grouped (AttentionBlockGroup), process-wide. Auto (the
// default) groups on CUDA, where launches would dominate (expected; not yet
// measured), and not on the CPU, where an op call costs little and the
// gathers' copies cost more (bench (a)/(b)/(c) shapes, one thread: grouped
// 1.6/1.5/1.1x slower, benchmarks/results/forest_profile_1thread.json); tests
// force both ways on the CPU.
enum class BlockGrouping : int64_t { kNever = 0, kAuto = 1, kAlways = 2 };
BlockGrouping attention_block_grouping();
void set_attention_block_grouping(BlockGrouping mode);

// Merges each block's softmax statistics into the running (o, m, l) of its
// query rows: o [T, H, D] unnormalised output relative to m, m [T, H] max
// scaled score, l [T, H] sum of exp(score - m), all in the accumulation
// dtype; q, k, v [T, H, D] in the inputs' dtype (row-strided views are fine).
void attention_blocks_forward(const AttentionBlockPlan& plan, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, double scale,
                              at::Tensor& o, at::Tensor& m, at::Tensor& l);

// out = o / l in `dtype` (contiguous [T, H, D]) and lse = m + log(l).
std::tuple<at::Tensor, at::Tensor> attention_finalize(const at::Tensor& o, const at::Tensor& m,
                                                      const at::Tensor& l, at::ScalarType dtype);

// Adds the blocks' contributions to dq, dk, dv [T, H, D] (accumulation
// dtype); q, k, v, grad_out in the inputs' dtype; lse, delta [T, H] (the
// forward log-sum-exp and rowsum(dO * O)) in the accumulation dtype.
void attention_blocks_backward(const AttentionBlockPlan& plan, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& grad_out, const at::Tensor& lse,
                               const at::Tensor& delta, double scale, at::Tensor& dq,
                               at::Tensor& dk, at::Tensor& dv);

}  // namespace hipro
