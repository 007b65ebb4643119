// Index math shared by the CPU and CUDA kernels of hipro_fast.
//
// A prompt forest is packed into T tokens laid out in DFS preorder of its
// segments: a segment's tokens are contiguous, and its whole subtree (its own
// tokens, then every descendant segment) occupies one contiguous token range.
// The segment table is an int64 [S, 4] row-major tensor with the columns
// below. Because of the preorder layout:
//   * query token q in segment s sees its own segment causally,
//     [offset(s), q], plus every ancestor segment in full;
//   * key token k in segment s is seen by exactly the query tokens
//     [k, subtree_end(s)) -- one contiguous range, which is what makes a
//     deterministic key-centric backward (dK, dV) cheap.
// Everything here is plain integer math so the CPU tests exercise exactly the
// logic the GPU kernels run.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HIPRO_HD __host__ __device__ __forceinline__
#else
#define HIPRO_HD inline
#endif

namespace hipro {

constexpr int kSegCols = 4;
constexpr int kColOffset = 0;      // first packed token of the segment
constexpr int kColLength = 1;      // number of tokens in the segment (the layout builder: >= 1)
constexpr int kColParent = 2;      // packed index of the parent segment, -1 for a root
constexpr int kColSubtreeEnd = 3;  // one past the last packed token of the subtree

// Longest root-to-segment chain the kernels support. Every segment holds at
// least one token and a prompt fits the text context (77 for CLIP), so real
// forests stay far below this; the layout builder enforces it.
constexpr int kMaxDepth = 128;

HIPRO_HD int64_t seg_offset(const int64_t* table, int64_t s) {
  return table[s * kSegCols + kColOffset];
}
HIPRO_HD int64_t seg_length(const int64_t* table, int64_t s) {
  return table[s * kSegCols + kColLength];
}
HIPRO_HD int64_t seg_parent(const int64_t* table, int64_t s) {
  return table[s * kSegCols + kColParent];
}
HIPRO_HD int64_t seg_subtree_end(const int64_t* table, int64_t s) {
  return table[s * kSegCols + kColSubtreeEnd];
}

// Fills [begins[i], ends[i]) with the key ranges visible to query token `q`
// of segment `seg`, root first (the order the tokens have in the full prompt,
// so float sums run in sequence order). Returns the number of ranges, or -1
// when the chain is deeper than `max_ranges`.
HIPRO_HD int visible_key_ranges(const int64_t* table, int64_t seg, int64_t q,
                                int64_t* begins, int64_t* ends, int max_ranges) {
  int depth = 0;
  for (int64_t a = seg; a >= 0; a = seg_parent(table, a)) {
    if (depth >= max_ranges) return -1;
    ++depth;
  }
  int i = depth - 1;
  begins[i] = seg_offset(table, seg);
  ends[i] = q + 1;
  for (int64_t a = seg_parent(table, seg); a >= 0; a = seg_parent(table, a)) {
    --i;
    begins[i] = seg_offset(table, a);
    ends[i] = seg_offset(table, a) + seg_length(table, a);
  }
  return depth;
}

// Number of keys visible to query token q of segment seg.
HIPRO_HD int64_t visible_key_count(const int64_t* table, int64_t seg, int64_t q) {
  int64_t n = q + 1 - seg_offset(table, seg);
  for (int64_t a = seg_parent(table, seg); a >= 0; a = seg_parent(table, a)) {
    n += seg_length(table, a);
  }
  return n;
}

// One past the last query token that sees key token k of segment seg; the
// first such query is k itself.
HIPRO_HD int64_t visible_query_end(const int64_t* table, int64_t seg) {
  return seg_subtree_end(table, seg);
}

// Whether query token q (in segment qseg) sees key token k (in segment kseg).
// Used by tests and the brute-force checks, not by the hot loops.
HIPRO_HD bool query_sees_key(const int64_t* table, int64_t qseg, int64_t q,
                             int64_t kseg, int64_t k) {
  if (kseg == qseg) return k <= q;
  return k <= q && q < seg_subtree_end(table, kseg) &&
         k >= seg_offset(table, kseg) &&
         k < seg_offset(table, kseg) + seg_length(table, kseg) &&
         q >= seg_offset(table, kseg) + seg_length(table, kseg);
}

// ---------------------------------------------------------------------------
// The segment-block decomposition (attention_blocks.h), shared by both
// backends. In preorder the queries that see *all* of segment s are one
// contiguous range, its strict descendants [offset(s) + length(s),
// subtree_end(s)); so (those queries x s's keys) is a dense block. A blocked
// segment's block goes through batched GEMMs; every other visible pair -- a
// token's own segment causally, and its ancestors that are not blocked -- is
// the residual, which the per-row kernels (CPU loops, CUDA warps) handle. The
// two functions below select the residual; the CPU tests check that residual
// plus blocks cover every visible pair exactly once, and the CUDA kernels call
// the same functions.

// First query row of segment s's block and its number of rows (0 for a leaf).
HIPRO_HD int64_t block_row_begin(const int64_t* table, int64_t s) {
  return seg_offset(table, s) + seg_length(table, s);
}
HIPRO_HD int64_t block_rows(const int64_t* table, int64_t s) {
  return seg_subtree_end(table, s) - block_row_begin(table, s);
}

// Whether segment s goes through the GEMM blocks: it has keys and descendant
// queries, and its block holds at least min_pairs (query, key) pairs.
HIPRO_HD bool segment_blocked(const int64_t* table, int64_t s, int64_t min_pairs) {
  const int64_t rows = block_rows(table, s), keys = seg_length(table, s);
  return rows > 0 && keys > 0 && rows * keys >= min_pairs;
}

// Fills [begins[i], ends[i]) with the residual key ranges of query token q of
// segment seg (blocked[s] != 0 marks the blocked segments): the ancestors
// that are not blocked, root first, then the own segment causally, last.
// Returns the number of ranges (>= 1), or -1 when they exceed max_ranges.
HIPRO_HD int residual_key_ranges(const int64_t* table, const uint8_t* blocked, int64_t seg,
                                 int64_t q, int64_t* begins, int64_t* ends, int max_ranges) {
  int n = 1;  // the own segment
  for (int64_t a = seg_parent(table, seg); a >= 0; a = seg_parent(table, a)) {
    if (!blocked[a]) ++n;
    if (n > max_ranges) return -1;
  }
  int i = n - 1;
  begins[i] = seg_offset(table, seg);
  ends[i] = q + 1;
  for (int64_t a = seg_parent(table, seg); a >= 0; a = seg_parent(table, a)) {
    if (blocked[a]) continue;
    --i;
    begins[i] = seg_offset(table, a);
    ends[i] = seg_offset(table, a) + seg_length(table, a);
  }
  return n;
}

// One past the last query that key token k of segment seg meets in the
// residual (the first is k itself): the end of its own segment when the
// segment is blocked (its descendants are in the block), else its subtree.
HIPRO_HD int64_t residual_query_end(const int64_t* table, const uint8_t* blocked, int64_t seg) {
  return blocked[seg] ? block_row_begin(table, seg) : visible_query_end(table, seg);
}

// Token source encoding used by forest assembly: ctx_row[t] >= 0 reads row
// ctx_row[t] of the packed context table; otherwise vocab_id[t] reads the
// frozen token-embedding table.
HIPRO_HD bool token_reads_context(int64_t ctx_row) { return ctx_row >= 0; }

// ---------------------------------------------------------------------------
// Validation predicates, the one definition of a well-formed forest for both
// backends: the CPU ops evaluate them on the host (check_forest_values in
// checks.cpp, which raises naming the culprit), the CUDA ops in a device-side
// validation kernel (no host sync), so a malformed table stops with an error
// instead of reading out of bounds. Every table the layout builder produces
// passes them.

// Row s of the segment table is safe for a forest of num_tokens tokens: its
// tokens and subtree lie inside [0, num_tokens) and its parent comes earlier
// in preorder (so every parent chain terminates and stays in range).
HIPRO_HD bool segment_row_in_range(const int64_t* table, int64_t s, int64_t num_tokens) {
  const int64_t off = seg_offset(table, s);
  const int64_t len = seg_length(table, s);
  // len <= num_tokens - off, not off + len <= num_tokens: a huge length must
  // not wrap around past the check.
  return off >= 0 && len >= 0 && len <= num_tokens - off &&
         seg_subtree_end(table, s) <= num_tokens && seg_parent(table, s) < s;
}

// Row s is a DFS-preorder row: its subtree holds its own tokens and ends
// inside its parent's. Reads the parent's row: call after the range check.
HIPRO_HD bool segment_row_nested(const int64_t* table, int64_t s) {
  const int64_t end = seg_offset(table, s) + seg_length(table, s);
  const int64_t p = seg_parent(table, s);
  if (seg_subtree_end(table, s) < end) return false;
  return p < 0 || seg_subtree_end(table, s) <= seg_subtree_end(table, p);
}

// Row s follows row s - 1 as DFS preorder packs them: its tokens start where
// the previous segment's end (segment 0 at token 0), its parent is that
// segment or one of its ancestors (-1: a new root), and every segment the
// walk from s - 1 up to that parent leaves has its subtree closed at s's
// first token. With in-range, nested rows this makes the table a packed
// preorder forest, so the two attention paths -- the GEMM blocks, which read
// subtree_end, and the per-row walk up the parent links -- see the same
// (query, key) pairs; a table that breaks it (e.g. a segment inside a
// sibling's tokens) would give results that depend on the path a segment
// takes. The walk follows parents that must be earlier rows (else false), so
// it ends within s steps.
HIPRO_HD bool segment_row_follows(const int64_t* table, int64_t s) {
  const int64_t start = seg_offset(table, s);
  if (s == 0) return start == 0 && seg_parent(table, 0) < 0;
  const int64_t r = s - 1;
  if (start != seg_offset(table, r) + seg_length(table, r)) return false;
  const int64_t p = seg_parent(table, s);
  for (int64_t a = r; a != p; a = seg_parent(table, a)) {
    if (a < 0 || seg_parent(table, a) >= a) return false;  // p is not on the chain above s - 1
    if (seg_subtree_end(table, a) != start) return false;  // a's subtree must close where s starts
  }
  return true;
}

// Row s lies at most kMaxDepth segments deep (itself and its ancestors), the
// depth the attention kernels' per-row ancestor walk holds; checked up front
// so that a deeper table is refused whichever path (blocks or rows) its
// segments would take. Walks parents that must be earlier rows (else false),
// so it ends within kMaxDepth steps.
HIPRO_HD bool segment_row_shallow(const int64_t* table, int64_t s) {
  int depth = 1;
  for (int64_t a = s; seg_parent(table, a) >= 0; a = seg_parent(table, a)) {
    if (seg_parent(table, a) >= a || ++depth > kMaxDepth) return false;
  }
  return true;
}

HIPRO_HD bool segment_row_valid(const int64_t* table, int64_t s, int64_t num_tokens) {
  return segment_row_in_range(table, s, num_tokens) && segment_row_nested(table, s) &&
         segment_row_follows(table, s) && segment_row_shallow(table, s);
}

// Token t names a segment inside [0, num_segments) that contains it.
HIPRO_HD bool token_in_segment(const int64_t* table, int64_t num_segments, int64_t t,
                               int64_t seg) {
  return seg >= 0 && seg < num_segments && t >= seg_offset(table, seg) &&
         t < seg_offset(table, seg) + seg_length(table, seg);
}

}  // namespace hipro
