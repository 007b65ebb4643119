// Packs a prompt forest (segments with parents and token sources) into the
// DFS-preorder token layout that the tree-attention kernels rely on.
// Pure C++ (no torch) so the C++ unit tests can exercise it directly.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace hipro {

// A token source: >= 0 is a row of the packed context table, < 0 encodes a
// frozen vocabulary id v as -(v + 1).
inline int64_t encode_vocab_source(int64_t vocab_id) { return -(vocab_id + 1); }

struct ForestLayout {
  // packed segment index -> caller's segment id
  std::vector<int64_t> packed_to_input;
  // caller's segment id -> packed segment index
  std::vector<int64_t> input_to_packed;
  // [S * 4] rows of (offset, length, parent, subtree_end), packed order
  std::vector<int64_t> segment_table;
  // per packed token
  std::vector<int64_t> token_segment;
  std::vector<int64_t> token_position;
  std::vector<int64_t> token_ctx_row;   // -1 when the token is a vocab token
  std::vector<int64_t> token_vocab_id;  // -1 when the token is a context row
  int64_t max_path_tokens = 0;          // longest root-to-leaf token count
};

// Raised for a malformed forest; `segment` names the culprit (caller's id).
class ForestLayoutError : public std::invalid_argument {
 public:
  ForestLayoutError(const std::string& what, int64_t segment)
      : std::invalid_argument(what), segment(segment) {}
  int64_t segment;
};

// parents[i]: caller's id of segment i's parent, -1 for a root.
// sources[i]: token sources of segment i (see encode_vocab_source).
// Children are visited in increasing caller id, so the layout is a pure
// function of the input. Throws ForestLayoutError when a parent is out of
// range, the parent links form a cycle, a segment is empty, or a root-to-
// segment path holds more than max_path_tokens tokens.
ForestLayout build_forest_layout(const std::vector<int64_t>& parents,
                                 const std::vector<std::vector<int64_t>>& sources,
                                 int64_t max_path_tokens);

}  // namespace hipro
