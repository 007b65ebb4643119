// Argument checks shared by the CPU and CUDA op implementations (see checks.h).
#include "checks.h"

#include <initializer_list>

#include "tree_index.h"

namespace hipro {
namespace {

std::string join_ints(c10::IntArrayRef values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) s += cat(i ? ", " : "", values[i]);
  return s + "]";
}

void check_index_vector(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.dim() == 1, cat(name, " must be 1-D, got shape ", shape_of(t)));
  TORCH_CHECK(t.scalar_type() == at::kLong, cat(name, " must be int64, got ", t.scalar_type()));
  TORCH_CHECK(numel < 0 || t.numel() == numel,
              cat(name, " must have ", numel, " entries, got ", t.numel()));
}

// A tensor argument and its name, for the checks over argument lists.
struct Named {
  const at::Tensor& tensor;
  const char* name;
};

void check_floating(std::initializer_list<Named> args) {
  for (const Named& a : args) {
    const auto st = a.tensor.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                cat(a.name, " must be float32, float64, float16 or bfloat16, got ", st));
  }
}

// Every tensor argument of an op lives on the device of the first one (the
// index tensors too: the CUDA kernels read them directly). On the CPU the
// dispatcher only picks the CPU kernel when every argument is a CPU tensor,
// so this never fires there.
void check_same_device(const at::Tensor& ref, std::initializer_list<Named> args) {
  for (const Named& a : args) {
    TORCH_CHECK(a.tensor.device() == ref.device(),
                cat(a.name, " must be on ", ref.device(), " like the other arguments, got ",
                    a.tensor.device()));
  }
}

void check_segment_table(const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kSegCols,
              cat("segment_table must be [S, 4] (offset, length, parent, subtree_end), got ",
                  shape_of(table)));
  TORCH_CHECK(table.scalar_type() == at::kLong, "segment_table must be int64");
  TORCH_CHECK(table.is_contiguous(), "segment_table must be contiguous");
}

void check_inner_contiguous(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, cat(name, " must be [T, H, D], got ", shape_of(x)));
  TORCH_CHECK(x.size(2) > 0, cat(name, " must have a head dim D >= 1, got ", shape_of(x)));
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2),
              cat(name, " must be contiguous within a row ([H, D] block), got strides ",
                  strides_of(x)));
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_inner_contiguous(q, "q");
  check_inner_contiguous(k, "k");
  check_inner_contiguous(v, "v");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              cat("q, k, v must have the same shape, got ", shape_of(q), ", ", shape_of(k), ", ",
                  shape_of(v)));
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype");
  check_floating({{q, "q"}});
}

// Why row s fails segment_row_valid, for the message (the predicate decides).
std::string segment_row_problem(const int64_t* table, int64_t s, int64_t num_tokens) {
  const int64_t parent = seg_parent(table, s);
  if (parent >= s) {
    return cat("segment ", s, " has parent ", parent, " which is not earlier in DFS preorder");
  }
  if (seg_subtree_end(table, s) > num_tokens) {
    return cat("segment ", s, " subtree ends past token ", num_tokens, " (subtree_end ",
               seg_subtree_end(table, s), ")");
  }
  if (!segment_row_in_range(table, s, num_tokens)) {
    return cat("segment ", s, " (offset ", seg_offset(table, s), ", length ", seg_length(table, s),
               ") does not lie inside the ", num_tokens, " tokens");
  }
  const int64_t end = seg_offset(table, s) + seg_length(table, s);
  if (seg_subtree_end(table, s) < end) {
    return cat("segment ", s, " subtree_end ", seg_subtree_end(table, s),
               " is before the end of its own tokens (", end, ")");
  }
  if (!segment_row_nested(table, s)) {
    return cat("segment ", s, " (subtree_end ", seg_subtree_end(table, s),
               ") is not nested in its parent ", parent, " (its subtree ends at ",
               seg_subtree_end(table, parent), ")");
  }
  if (!segment_row_follows(table, s)) {
    return cat("segment ", s, " (offset ", seg_offset(table, s), ", parent ", parent,
               ") does not follow segment ", s - 1, " in packed DFS preorder (its tokens must start "
               "where the previous segment's end, under that segment or one of its ancestors, whose "
               "subtrees close there)");
  }
  return cat("segment ", s, " lies more than ", kMaxDepth,
             " segments deep (itself and its ancestors), deeper than the attention kernels support");
}

}  // namespace

std::string shape_of(const at::Tensor& t) { return join_ints(t.sizes()); }

std::string strides_of(const at::Tensor& t) { return join_ints(t.strides()); }

void check_at_most(int64_t value, int64_t limit, const char* what) {
  TORCH_CHECK(value <= limit, cat(what, " must be <= ", limit, ", got ", value));
}

// ---------------------------------------------------------------------------
// Argument checks.

void check_assemble_args(const at::Tensor& ctx_table, const at::Tensor& token_embedding,
                         const at::Tensor& positional_embedding, const at::Tensor& token_ctx_row,
                         const at::Tensor& token_vocab_id, const at::Tensor& token_position) {
  check_index_vector(token_ctx_row, "token_ctx_row", -1);
  const int64_t T = token_ctx_row.numel();
  check_index_vector(token_vocab_id, "token_vocab_id", T);
  check_index_vector(token_position, "token_position", T);
  TORCH_CHECK(ctx_table.dim() == 2 && token_embedding.dim() == 2 &&
                  positional_embedding.dim() == 2,
              "ctx_table, token_embedding, positional_embedding must be 2-D");
  const int64_t W = ctx_table.size(1);
  TORCH_CHECK(token_embedding.size(1) == W && positional_embedding.size(1) == W,
              cat("width mismatch: ctx_table ", shape_of(ctx_table), ", token_embedding ",
                  shape_of(token_embedding), ", positional_embedding ",
                  shape_of(positional_embedding)));
  TORCH_CHECK(token_embedding.scalar_type() == ctx_table.scalar_type() &&
                  positional_embedding.scalar_type() == ctx_table.scalar_type(),
              "ctx_table, token_embedding and positional_embedding must share a dtype");
  check_floating({{ctx_table, "ctx_table"}});
  check_same_device(ctx_table, {{token_embedding, "token_embedding"},
                                {positional_embedding, "positional_embedding"},
                                {token_ctx_row, "token_ctx_row"},
                                {token_vocab_id, "token_vocab_id"},
                                {token_position, "token_position"}});
}

void check_assemble_backward_args(const at::Tensor& grad_out, const at::Tensor& token_ctx_row,
                                  int64_t num_ctx_rows) {
  TORCH_CHECK(grad_out.dim() == 2, cat("grad_out must be [T, W], got ", shape_of(grad_out)));
  check_index_vector(token_ctx_row, "token_ctx_row", grad_out.size(0));
  TORCH_CHECK(num_ctx_rows >= 0, cat("num_ctx_rows must be >= 0, got ", num_ctx_rows));
  check_floating({{grad_out, "grad_out"}});
  check_same_device(grad_out, {{token_ctx_row, "token_ctx_row"}});
}

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& segment_table, const at::Tensor& token_segment) {
  check_qkv(q, k, v);
  check_same_device(q, {{k, "k"},
                       {v, "v"},
                       {segment_table, "segment_table"},
                       {token_segment, "token_segment"}});
  const int64_t T = q.size(0);
  check_segment_table(segment_table);
  check_index_vector(token_segment, "token_segment", T);
  TORCH_CHECK(token_segment.is_contiguous(), "token_segment must be contiguous");
  TORCH_CHECK(T == 0 || segment_table.size(0) > 0,
              cat("segment_table is empty but there are ", T, " tokens"));
}

void check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& out, const at::Tensor& lse,
                                   const at::Tensor& segment_table,
                                   const at::Tensor& token_segment) {
  check_attention_args(q, k, v, segment_table, token_segment);
  TORCH_CHECK(grad_out.sizes() == q.sizes(),
              cat("grad_out must be ", shape_of(q), ", got ", shape_of(grad_out)));
  TORCH_CHECK(out.sizes() == q.sizes(), cat("out must be ", shape_of(q), ", got ", shape_of(out)));
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1),
              cat("lse must be [T, H] = [", q.size(0), ", ", q.size(1), "], got ", shape_of(lse)));
  check_floating({{grad_out, "grad_out"}, {out, "out"}, {lse, "lse"}});
  check_same_device(q, {{grad_out, "grad_out"}, {out, "out"}, {lse, "lse"}});
}

void check_pool_args(const at::Tensor& x, const at::Tensor& eos_index, const at::Tensor& ln_weight,
                     const at::Tensor& ln_bias, const at::Tensor& projection) {
  TORCH_CHECK(x.dim() == 2, cat("x must be [T, W], got ", shape_of(x)));
  check_index_vector(eos_index, "eos_index", -1);
  const int64_t W = x.size(1);
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == W && ln_bias.dim() == 1 &&
                  ln_bias.size(0) == W,
              cat("ln_weight and ln_bias must be [", W, "], got ", shape_of(ln_weight), " and ",
                  shape_of(ln_bias)));
  TORCH_CHECK(projection.dim() == 2 && projection.size(0) == W,
              cat("projection must be [", W, ", E], got ", shape_of(projection)));
  check_floating(
      {{x, "x"}, {ln_weight, "ln_weight"}, {ln_bias, "ln_bias"}, {projection, "projection"}});
  check_same_device(x, {{eos_index, "eos_index"},
                        {ln_weight, "ln_weight"},
                        {ln_bias, "ln_bias"},
                        {projection, "projection"}});
}

void check_pool_backward_args(const at::Tensor& grad_features, const at::Tensor& features,
                              const at::Tensor& x_hat, const at::Tensor& rstd,
                              const at::Tensor& proj_norm, const at::Tensor& ln_weight,
                              const at::Tensor& projection, const at::Tensor& eos_index,
                              int64_t num_tokens, at::ScalarType x_dtype) {
  TORCH_CHECK(at::isFloatingType(x_dtype),
              cat("x_dtype (the gradient's dtype) must be a floating type, got ", x_dtype));
  TORCH_CHECK(x_hat.dim() == 2, cat("x_hat must be [P, W], got ", shape_of(x_hat)));
  const int64_t P = x_hat.size(0), W = x_hat.size(1);
  const auto acc = x_hat.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              cat("x_hat must be float32 or float64, got ", acc));
  TORCH_CHECK(projection.dim() == 2 && projection.size(0) == W,
              cat("projection must be [", W, ", E], got ", shape_of(projection)));
  const int64_t E = projection.size(1);
  TORCH_CHECK(grad_features.dim() == 2 && grad_features.size(0) == P &&
                  grad_features.size(1) == E,
              cat("grad_features must be [", P, ", ", E, "], got ", shape_of(grad_features)));
  TORCH_CHECK(features.sizes() == grad_features.sizes(),
              cat("features must be [", P, ", ", E, "], got ", shape_of(features)));
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == P,
              cat("rstd must be [", P, "], got ", shape_of(rstd)));
  TORCH_CHECK(proj_norm.dim() == 1 && proj_norm.size(0) == P,
              cat("proj_norm must be [", P, "], got ", shape_of(proj_norm)));
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == W,
              cat("ln_weight must be [", W, "], got ", shape_of(ln_weight)));
  check_index_vector(eos_index, "eos_index", P);
  TORCH_CHECK(num_tokens >= 0, cat("num_tokens must be >= 0, got ", num_tokens));
  const std::initializer_list<Named> floating = {
      {grad_features, "grad_features"}, {features, "features"},    {rstd, "rstd"},
      {proj_norm, "proj_norm"},         {ln_weight, "ln_weight"},  {projection, "projection"}};
  check_floating(floating);
  check_same_device(x_hat, floating);
  check_same_device(x_hat, {{eos_index, "eos_index"}});
}

// ---------------------------------------------------------------------------
// Value checks (CPU).

void check_assemble_values(const at::Tensor& token_ctx_row, const at::Tensor& token_vocab_id,
                           const at::Tensor& token_position, int64_t num_ctx_rows,
                           int64_t vocab_rows, int64_t positions) {
  const int64_t T = token_ctx_row.numel();
  const int64_t* crow = token_ctx_row.data_ptr<int64_t>();
  const int64_t* vid = token_vocab_id.data_ptr<int64_t>();
  const int64_t* tpos = token_position.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(token_reads_context(crow[t]) ? crow[t] < num_ctx_rows
                                             : (vid[t] >= 0 && vid[t] < vocab_rows),
                cat("token ", t, " has an out-of-range source (ctx_row ", crow[t], ", vocab_id ",
                    vid[t], ")"));
    TORCH_CHECK(tpos[t] >= 0 && tpos[t] < positions,
                cat("token ", t, " has position ", tpos[t], " outside the positional table of ",
                    positions, " rows"));
  }
}

void check_ctx_rows(const at::Tensor& token_ctx_row, int64_t num_ctx_rows) {
  const int64_t* crow = token_ctx_row.data_ptr<int64_t>();
  for (int64_t t = 0; t < token_ctx_row.numel(); ++t) {
    TORCH_CHECK(crow[t] < num_ctx_rows,
                cat("token ", t, " reads ctx row ", crow[t], " >= ", num_ctx_rows));
  }
}

void check_forest_values(const at::Tensor& segment_table, const at::Tensor& token_segment) {
  const int64_t S = segment_table.size(0), T = token_segment.numel();
  const int64_t* table = segment_table.data_ptr<int64_t>();
  const int64_t* tseg = token_segment.data_ptr<int64_t>();
  // Rows first: token_in_segment reads the row a token names.
  check_segment_rows(table, S, T);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = tseg[t];
    if (token_in_segment(table, S, t, s)) continue;
    TORCH_CHECK(s >= 0 && s < S, cat("token ", t, " names segment ", s, " outside [0, ", S, ")"));
    TORCH_CHECK(false, cat("token ", t, " lies outside its segment ", s, " (tokens [",
                           seg_offset(table, s), ", ", seg_offset(table, s) + seg_length(table, s),
                           "))"));
  }
}

void check_segment_rows(const int64_t* table, int64_t num_segments, int64_t num_tokens) {
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK(segment_row_valid(table, s, num_tokens), segment_row_problem(table, s, num_tokens));
  }
}

void check_eos_values(const at::Tensor& eos_index, int64_t num_tokens) {
  const int64_t* e = eos_index.data_ptr<int64_t>();
  for (int64_t p = 0; p < eos_index.numel(); ++p) {
    TORCH_CHECK(e[p] >= 0 && e[p] < num_tokens,
                cat("eos_index[", p, "] = ", e[p], " outside [0, ", num_tokens, ")"));
  }
}

}  // namespace hipro
