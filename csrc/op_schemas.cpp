// Operator schemas of hipro_fast (TORCH_LIBRARY). Device implementations
// register against them in cpu/ and cuda/; this file has no Python so the
// libtorch (CMake) build links it too.
#include <torch/library.h>

TORCH_LIBRARY(hipro_fast, m) {
  // out[t] = (ctx_row[t] >= 0 ? ctx_table[ctx_row[t]] : token_embedding[vocab_id[t]])
  //          + positional_embedding[position[t]]
  m.def(
      "assemble_forest(Tensor ctx_table, Tensor token_embedding, Tensor positional_embedding, "
      "Tensor token_ctx_row, Tensor token_vocab_id, Tensor token_position) -> Tensor");
  // grad_ctx_table[r] = sum_{t : ctx_row[t] == r} grad_out[t]   (fp32 accumulation)
  m.def(
      "assemble_forest_backward(Tensor grad_out, Tensor token_ctx_row, SymInt num_ctx_rows) "
      "-> Tensor");
  // Tree attention over packed q, k, v [T, H, D]; returns out [T, H, D] and the
  // fp32 log-sum-exp [T, H] of the scaled scores.
  m.def(
      "tree_attention(Tensor q, Tensor k, Tensor v, Tensor segment_table, "
      "Tensor token_segment, float scale) -> (Tensor, Tensor)");
  m.def(
      "tree_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor segment_table, Tensor token_segment, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  // EOS gather + LayerNorm + projection + L2 normalisation.
  // Returns features [P, E] (fp32), x_hat [P, W] (fp32, normalised pre-affine
  // LayerNorm input), rstd [P] and the projection norm [P] (saved for backward).
  m.def(
      "pool_eos(Tensor x, Tensor eos_index, Tensor ln_weight, Tensor ln_bias, "
      "Tensor projection, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradient w.r.t. x [T, W] (zero except at the EOS rows), in x's dtype.
  m.def(
      "pool_eos_backward(Tensor grad_features, Tensor features, Tensor x_hat, Tensor rstd, "
      "Tensor proj_norm, Tensor ln_weight, Tensor projection, Tensor eos_index, "
      "SymInt num_tokens, ScalarType x_dtype) -> Tensor");
}
