// Host-side argument checks of the hipro_fast ops: one set per op, called by
// both the CPU (cpu/) and the CUDA (cuda/) implementation, so the backends
// reject the same arguments with the same messages.
//
// Two kinds:
//   * check_<op>_args: shapes, dtypes, devices and layouts. Metadata only, so
//     both backends run them before touching any data.
//   * check_<...>_values: the index *values* (ranges, forest structure). They
//     read the index data on the host, so only the CPU ops call them; the
//     CUDA ops test the same conditions on the device with kernel assertions
//     (no device->host sync). The forest conditions are the predicates of
//     tree_index.h (segment_row_valid, token_in_segment), which the CUDA
//     validation kernel evaluates too.
//
// Defined once in checks.cpp, compiled by the host compiler only, rather than
// inline here: on a GPU machine a failing inline check compiled into an nvcc
// translation unit crashed the process (a shape-mismatch TORCH_CHECK whose
// message streamed IntArrayRef) instead of raising, and on the H200 image a
// failing check that streamed an integer crashed inside libstdc++'s stream
// code (a toolchain mismatch). So messages are built by cat() below, which
// formats integers with std::to_string and passes TORCH_CHECK one
// std::string (c10 then uses it as is, no std::ostream in this library).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace hipro {

namespace detail {
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const at::Device& d) { s += d.str(); }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T x) {
  s += std::to_string(x);
}
}  // namespace detail

// Concatenates strings, integers, dtypes and devices into one message.
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

// "[T, H, D]": a tensor's shape (or strides) as text, for error messages.
std::string shape_of(const at::Tensor& t);
std::string strides_of(const at::Tensor& t);

// `what` must be <= limit (a backend's launch or kernel limit).
void check_at_most(int64_t value, int64_t limit, const char* what);

// ---------------------------------------------------------------------------
// Argument checks (both backends).

// assemble_forest: three int64 index vectors of one length T; three 2-D
// tables of one width and one floating dtype; all on one device.
void check_assemble_args(const at::Tensor& ctx_table, const at::Tensor& token_embedding,
                         const at::Tensor& positional_embedding, const at::Tensor& token_ctx_row,
                         const at::Tensor& token_vocab_id, const at::Tensor& token_position);
// assemble_forest_backward: grad_out [T, W] floating, token_ctx_row int64 [T].
void check_assemble_backward_args(const at::Tensor& grad_out, const at::Tensor& token_ctx_row,
                                  int64_t num_ctx_rows);

// tree_attention: q, k, v [T, H, D] of one floating dtype, each token's
// [H, D] block contiguous (rows may be strided, e.g. slices of a packed
// [T, 3, H, D] qkv); segment_table int64 [S, 4] and token_segment int64 [T],
// contiguous; all on q's device.
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& segment_table, const at::Tensor& token_segment);
// tree_attention_backward: the forward's checks, plus grad_out and out
// [T, H, D] and lse [T, H], floating, on q's device.
void check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& out, const at::Tensor& lse,
                                   const at::Tensor& segment_table,
                                   const at::Tensor& token_segment);

// pool_eos: x [T, W], eos_index int64 [P], ln_weight and ln_bias [W],
// projection [W, E]; floating, on x's device.
void check_pool_args(const at::Tensor& x, const at::Tensor& eos_index, const at::Tensor& ln_weight,
                     const at::Tensor& ln_bias, const at::Tensor& projection);
// pool_eos_backward: x_hat [P, W] fp32/fp64, grad_features and features
// [P, E], rstd and proj_norm [P], ln_weight [W], projection [W, E],
// eos_index int64 [P], num_tokens >= 0; on x_hat's device.
void check_pool_backward_args(const at::Tensor& grad_features, const at::Tensor& features,
                              const at::Tensor& x_hat, const at::Tensor& rstd,
                              const at::Tensor& proj_norm, const at::Tensor& ln_weight,
                              const at::Tensor& projection, const at::Tensor& eos_index,
                              int64_t num_tokens, at::ScalarType x_dtype);

// ---------------------------------------------------------------------------
// Value checks (CPU backend; the arguments already passed the checks above
// and the index vectors are contiguous CPU tensors).

// Every token reads an existing context row (ctx_row in [0, num_ctx_rows))
// or vocabulary row (ctx_row < 0, vocab_id in [0, vocab_rows)), and its
// position is a row of the positional table.
void check_assemble_values(const at::Tensor& token_ctx_row, const at::Tensor& token_vocab_id,
                           const at::Tensor& token_position, int64_t num_ctx_rows,
                           int64_t vocab_rows, int64_t positions);
// Every ctx_row is < num_ctx_rows (negative: the token reads the vocabulary).
void check_ctx_rows(const at::Tensor& token_ctx_row, int64_t num_ctx_rows);
// Every segment row passes segment_row_valid and every token lies inside the
// segment token_segment names (token_in_segment), for a forest of
// token_segment.numel() tokens. Memory safety of the CPU attention rests on it.
void check_forest_values(const at::Tensor& segment_table, const at::Tensor& token_segment);
// Every row of a host segment table (int64 [S, 4] row-major) passes
// segment_row_valid for a forest of num_tokens tokens. Also run by the block
// planner on its host copy of a device table (attention_blocks.h).
void check_segment_rows(const int64_t* table, int64_t num_segments, int64_t num_tokens);
// Every eos index is a token in [0, num_tokens).
void check_eos_values(const at::Tensor& eos_index, int64_t num_tokens);

}  // namespace hipro
