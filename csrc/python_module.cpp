// The pybind11 module `hipro_fast._C`: build information and the non-tensor
// forest-layout helper. Operator schemas are in op_schemas.cpp.
#include <Python.h>
#include <torch/extension.h>

#include "attention_blocks.h"
#include "forest_layout.h"
#include "tree_index.h"

namespace {

torch::Tensor to_tensor(const std::vector<int64_t>& v) {
  auto t = torch::empty({static_cast<int64_t>(v.size())}, torch::kInt64);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

pybind11::dict forest_layout_py(const std::vector<int64_t>& parents,
                                const std::vector<std::vector<int64_t>>& sources,
                                int64_t max_path_tokens) {
  hipro::ForestLayout layout;
  try {
    layout = hipro::build_forest_layout(parents, sources, max_path_tokens);
  } catch (const hipro::ForestLayoutError& e) {
    // Python maps this to hipro_fast.ForestError with the culprit segment.
    throw pybind11::value_error(std::string(e.what()) + " [segment=" +
                                std::to_string(e.segment) + "]");
  }
  const int64_t num_segments = static_cast<int64_t>(layout.packed_to_input.size());
  pybind11::dict d;
  d["segment_table"] = to_tensor(layout.segment_table).view({num_segments, hipro::kSegCols});
  d["packed_to_input"] = to_tensor(layout.packed_to_input);
  d["input_to_packed"] = to_tensor(layout.input_to_packed);
  d["token_segment"] = to_tensor(layout.token_segment);
  d["token_position"] = to_tensor(layout.token_position);
  d["token_ctx_row"] = to_tensor(layout.token_ctx_row);
  d["token_vocab_id"] = to_tensor(layout.token_vocab_id);
  d["max_path_tokens"] = layout.max_path_tokens;
  return d;
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu"] = true;
#ifdef HIPRO_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(HIPRO_CUDA_ARCHS);
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string("");
#endif
  d["torch_version"] = std::string(TORCH_VERSION);
  d["max_depth"] = hipro::kMaxDepth;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hipro_fast compiled ops: build info and forest layout";
  m.def("build_info", &build_info, "What was compiled: CPU, CUDA and its archs.");
  m.def("build_forest_layout", &forest_layout_py, pybind11::arg("parents"),
        pybind11::arg("sources"), pybind11::arg("max_path_tokens"),
        "Pack a prompt forest into the DFS-preorder token layout (see tree_index.h).");
  m.def("attention_block_min_pairs", &hipro::attention_block_min_pairs,
        "Tree attention (CPU and CUDA): minimum (descendant queries x keys) of a segment "
        "handled by the GEMM blocks.");
  m.def("set_attention_block_min_pairs", &hipro::set_attention_block_min_pairs,
        pybind11::arg("min_pairs"),
        "Set it (0: every segment with descendants; a huge value: the per-row kernels only).");
  m.def(
      "attention_block_grouping",
      [] { return static_cast<int64_t>(hipro::attention_block_grouping()); },
      "Tree attention: block grouping, 0 never, 1 auto (on CUDA only), 2 always.");
  m.def(
      "set_attention_block_grouping",
      [](int64_t mode) {
        hipro::set_attention_block_grouping(static_cast<hipro::BlockGrouping>(mode));
      },
      pybind11::arg("mode"), "Set it (a performance knob and a test hook).");
  m.def(
      "attention_plan_cache_stats",
      [] {
        const auto s = hipro::attention_plan_cache_stats();
        return std::make_pair(s.misses, s.hits);
      },
      "(plans computed, plans reused) by the tree-attention block planner's cache.");
}
