#include "forest_layout.h"

#include <algorithm>

#include "tree_index.h"

namespace hipro {

ForestLayout build_forest_layout(const std::vector<int64_t>& parents,
                                 const std::vector<std::vector<int64_t>>& sources,
                                 int64_t max_path_tokens) {
  const int64_t n = static_cast<int64_t>(parents.size());
  if (static_cast<int64_t>(sources.size()) != n) {
    throw ForestLayoutError("parents and sources must have the same length", -1);
  }
  std::vector<std::vector<int64_t>> children(n);
  std::vector<int64_t> roots;
  for (int64_t i = 0; i < n; ++i) {
    if (sources[i].empty()) {
      throw ForestLayoutError("segment " + std::to_string(i) + " has no tokens", i);
    }
    const int64_t p = parents[i];
    if (p == -1) {
      roots.push_back(i);
    } else if (p < 0 || p >= n || p == i) {
      throw ForestLayoutError("segment " + std::to_string(i) + " has invalid parent " +
                                  std::to_string(p),
                              i);
    } else {
      children[p].push_back(i);
    }
  }

  ForestLayout out;
  out.input_to_packed.assign(n, -1);
  out.packed_to_input.reserve(n);
  std::vector<int64_t> start_position(n, 0);
  std::vector<int64_t> depth(n, 0);
  int64_t total_tokens = 0;
  // Iterative DFS; children pushed in reverse so they pop in increasing id.
  std::vector<int64_t> stack(roots.rbegin(), roots.rend());
  while (!stack.empty()) {
    const int64_t s = stack.back();
    stack.pop_back();
    const int64_t p = parents[s];
    start_position[s] = p < 0 ? 0 : start_position[p] + static_cast<int64_t>(sources[p].size());
    depth[s] = p < 0 ? 1 : depth[p] + 1;
    const int64_t path_tokens = start_position[s] + static_cast<int64_t>(sources[s].size());
    if (path_tokens > max_path_tokens) {
      throw ForestLayoutError("segment " + std::to_string(s) + " ends at path position " +
                                  std::to_string(path_tokens) + " > limit " +
                                  std::to_string(max_path_tokens),
                              s);
    }
    if (depth[s] > kMaxDepth) {
      throw ForestLayoutError("segment " + std::to_string(s) + " is deeper than " +
                                  std::to_string(kMaxDepth),
                              s);
    }
    out.max_path_tokens = std::max(out.max_path_tokens, path_tokens);
    out.input_to_packed[s] = static_cast<int64_t>(out.packed_to_input.size());
    out.packed_to_input.push_back(s);
    total_tokens += static_cast<int64_t>(sources[s].size());
    for (auto it = children[s].rbegin(); it != children[s].rend(); ++it) stack.push_back(*it);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (out.input_to_packed[i] < 0) {
      throw ForestLayoutError("segment " + std::to_string(i) +
                                  " is not reachable from a root (cycle in parents)",
                              i);
    }
  }

  out.segment_table.assign(n * kSegCols, 0);
  out.token_segment.reserve(total_tokens);
  out.token_position.reserve(total_tokens);
  out.token_ctx_row.reserve(total_tokens);
  out.token_vocab_id.reserve(total_tokens);
  int64_t offset = 0;
  for (int64_t ps = 0; ps < n; ++ps) {
    const int64_t s = out.packed_to_input[ps];
    const auto& src = sources[s];
    int64_t* row = &out.segment_table[ps * kSegCols];
    row[kColOffset] = offset;
    row[kColLength] = static_cast<int64_t>(src.size());
    row[kColParent] = parents[s] < 0 ? -1 : out.input_to_packed[parents[s]];
    for (size_t j = 0; j < src.size(); ++j) {
      out.token_segment.push_back(ps);
      out.token_position.push_back(start_position[s] + static_cast<int64_t>(j));
      const int64_t code = src[j];
      out.token_ctx_row.push_back(code >= 0 ? code : -1);
      out.token_vocab_id.push_back(code >= 0 ? -1 : -code - 1);
    }
    offset += static_cast<int64_t>(src.size());
  }
  // Subtree ends, children before parents: walk packed order backwards.
  for (int64_t ps = n - 1; ps >= 0; --ps) {
    int64_t* row = &out.segment_table[ps * kSegCols];
    row[kColSubtreeEnd] = std::max(row[kColSubtreeEnd], row[kColOffset] + row[kColLength]);
    const int64_t parent = row[kColParent];
    if (parent >= 0) {
      int64_t* prow = &out.segment_table[parent * kSegCols];
      prow[kColSubtreeEnd] = std::max(prow[kColSubtreeEnd], row[kColSubtreeEnd]);
    }
  }
  return out;
}

}  // namespace hipro
