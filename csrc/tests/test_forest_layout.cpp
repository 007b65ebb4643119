// Layout builder and the shared index math of tree_index.h, on fixed and
// random forests: every (query, key) visibility answer from the range helpers
// must equal the definition (key in an ancestor segment, or earlier in the
// query's own segment); and for every block threshold, the segment-block
// decomposition (the blocks of the segments segment_blocked picks, plus the
// residual that residual_key_ranges gives the query-centric kernels and
// residual_query_end the key-centric ones -- the functions the CUDA kernels
// call) covers every visible pair exactly once and nothing else.
#include <random>
#include <set>
#include <vector>

#include "check.h"
#include "forest_layout.h"
#include "tree_index.h"

using namespace hipro;

static bool is_ancestor_or_self(const ForestLayout& L, int64_t a, int64_t s) {
  for (int64_t x = s; x >= 0; x = seg_parent(L.segment_table.data(), x))
    if (x == a) return true;
  return false;
}

static void check_visibility(const ForestLayout& L) {
  const int64_t* tab = L.segment_table.data();
  const int64_t T = static_cast<int64_t>(L.token_segment.size());
  int64_t begins[kMaxDepth], ends[kMaxDepth];
  for (int64_t q = 0; q < T; ++q) {
    const int64_t qs = L.token_segment[q];
    const int n = visible_key_ranges(tab, qs, q, begins, ends, kMaxDepth);
    EXPECT(n >= 1);
    std::set<int64_t> from_ranges;
    for (int r = 0; r < n; ++r)
      for (int64_t k = begins[r]; k < ends[r]; ++k) from_ranges.insert(k);
    EXPECT(static_cast<int64_t>(from_ranges.size()) == visible_key_count(tab, qs, q));
    for (int r = 1; r < n; ++r) EXPECT(begins[r] > begins[r - 1]);  // root first
    for (int64_t k = 0; k < T; ++k) {
      const int64_t ks = L.token_segment[k];
      const bool expected = (ks == qs) ? k <= q : (ks != qs && is_ancestor_or_self(L, ks, qs));
      EXPECT(from_ranges.count(k) == static_cast<size_t>(expected));
      EXPECT(query_sees_key(tab, qs, q, ks, k) == expected);
      const bool by_query_range = k <= q && q < visible_query_end(tab, ks);
      EXPECT(by_query_range == expected);
    }
  }
}

static void check_decomposition(const ForestLayout& L, int64_t min_pairs) {
  const int64_t* tab = L.segment_table.data();
  const int64_t S = static_cast<int64_t>(L.segment_table.size()) / kSegCols;
  const int64_t T = static_cast<int64_t>(L.token_segment.size());
  std::vector<uint8_t> blocked(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) blocked[s] = segment_blocked(tab, s, min_pairs) ? 1 : 0;
  // cover[q * T + k]: how many times the decomposition computes pair (q, k).
  std::vector<int> cover(static_cast<size_t>(T * T), 0);
  for (int64_t s = 0; s < S; ++s) {
    if (!blocked[s]) continue;
    EXPECT(block_rows(tab, s) > 0 && block_rows(tab, s) * seg_length(tab, s) >= min_pairs);
    for (int64_t q = block_row_begin(tab, s); q < block_row_begin(tab, s) + block_rows(tab, s); ++q)
      for (int64_t k = seg_offset(tab, s); k < seg_offset(tab, s) + seg_length(tab, s); ++k)
        ++cover[q * T + k];
  }
  int64_t begins[kMaxDepth], ends[kMaxDepth];
  std::vector<uint8_t> residual(static_cast<size_t>(T * T), 0);
  for (int64_t q = 0; q < T; ++q) {
    const int n = residual_key_ranges(tab, blocked.data(), L.token_segment[q], q, begins, ends,
                                      kMaxDepth);
    EXPECT(n >= 1);
    EXPECT(begins[n - 1] == seg_offset(tab, L.token_segment[q]) && ends[n - 1] == q + 1);
    for (int r = 1; r < n; ++r) EXPECT(begins[r] >= ends[r - 1]);  // root first, disjoint
    for (int r = 0; r < n; ++r)
      for (int64_t k = begins[r]; k < ends[r]; ++k) {
        ++cover[q * T + k];
        residual[q * T + k] = 1;
      }
  }
  for (int64_t q = 0; q < T; ++q) {
    for (int64_t k = 0; k < T; ++k) {
      const int64_t ks = L.token_segment[k];
      const bool visible = query_sees_key(tab, L.token_segment[q], q, ks, k);
      EXPECT(cover[q * T + k] == (visible ? 1 : 0));
      // The key-centric residual range agrees with the query-centric one.
      const bool by_key = k <= q && q < residual_query_end(tab, blocked.data(), ks);
      EXPECT(by_key == (residual[q * T + k] != 0));
    }
  }
  // Too small a range buffer is reported, not overrun.
  if (T > 0) {
    const int64_t deepest = L.token_segment[T - 1];
    int depth = 0;
    for (int64_t a = deepest; a >= 0; a = seg_parent(tab, a)) ++depth;
    if (depth > 1 && min_pairs > T * T) {  // nothing blocked: one range per level
      EXPECT(residual_key_ranges(tab, blocked.data(), deepest, T - 1, begins, ends, depth - 1) == -1);
    }
  }
}

int main() {
  // root [SOS ctx ctx] -> two children, one with a grandchild
  {
    std::vector<int64_t> parents = {-1, 0, 0, 1};
    std::vector<std::vector<int64_t>> sources = {
        {encode_vocab_source(49406), 0, 1}, {2, 3}, {encode_vocab_source(7), encode_vocab_source(49407)},
        {encode_vocab_source(8)}};
    ForestLayout L = build_forest_layout(parents, sources, 77);
    EXPECT(L.token_segment.size() == 8);
    EXPECT(L.packed_to_input == std::vector<int64_t>({0, 1, 3, 2}));
    EXPECT(L.max_path_tokens == 6);
    const int64_t* tab = L.segment_table.data();
    EXPECT(seg_subtree_end(tab, 0) == 8);
    EXPECT(seg_subtree_end(tab, 1) == 6);  // segment 1 then its child (packed 2)
    EXPECT(L.token_position[5] == 5);      // grandchild token after 3 + 2 tokens
    EXPECT(L.token_vocab_id[0] == 49406 && L.token_ctx_row[0] == -1);
    EXPECT(L.token_ctx_row[1] == 0);
    check_visibility(L);
    for (int64_t pairs : {0, 2, 4, 1 << 30}) check_decomposition(L, pairs);
  }
  // errors name the segment
  {
    bool threw = false;
    try {
      build_forest_layout({-1, 0}, {{1, 2, 3}, {4, 5}}, 4);
    } catch (const ForestLayoutError& e) {
      threw = e.segment == 1;
    }
    EXPECT(threw);
    threw = false;
    try {
      build_forest_layout({1, 0}, {{1}, {2}}, 10);
    } catch (const ForestLayoutError& e) {
      threw = true;
    }
    EXPECT(threw);
  }
  // random forests
  std::mt19937_64 rng(1234);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 25);
    std::vector<int64_t> parents(n);
    std::vector<std::vector<int64_t>> sources(n);
    for (int i = 0; i < n; ++i) {
      parents[i] = (i == 0 || rng() % 8 == 0) ? -1 : static_cast<int64_t>(rng() % i);
      const int len = 1 + static_cast<int>(rng() % 5);
      for (int j = 0; j < len; ++j) sources[i].push_back(static_cast<int64_t>(rng() % 100));
    }
    ForestLayout L = build_forest_layout(parents, sources, 1 << 20);
    check_visibility(L);
    for (int64_t pairs : {int64_t{0}, int64_t{1}, int64_t{6}, int64_t{20}, int64_t{1} << 40})
      check_decomposition(L, pairs);
  }
  TEST_MAIN_END();
}
