// Argument checks shared by the CPU and CUDA op implementations (see checks.h).
#include "checks.h"

#include <sstream>

namespace hipro {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

std::string strides_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.strides();
  return s.str();
}

void check_index_vector(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", shape_of(t));
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(numel < 0 || t.numel() == numel, name, " must have ", numel, " entries, got ",
              t.numel());
}

void check_segment_table(const at::Tensor& table, int64_t num_tokens) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kSegCols,
              "segment_table must be [S, 4] (offset, length, parent, subtree_end), got ",
              shape_of(table));
  TORCH_CHECK(table.scalar_type() == at::kLong, "segment_table must be int64");
  TORCH_CHECK(table.is_contiguous(), "segment_table must be contiguous");
  (void)num_tokens;
}

void check_inner_contiguous(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be [T, H, D], got ", shape_of(x));
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, " must be contiguous within a row ([H, D] block), got strides ", strides_of(x));
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_inner_contiguous(q, "q");
  check_inner_contiguous(k, "k");
  check_inner_contiguous(v, "v");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must have the same shape, got ", shape_of(q), ", ", shape_of(k), ", ",
              shape_of(v));
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype");
}

void check_pool_shapes(const at::Tensor& x, const at::Tensor& eos_index,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                       const at::Tensor& projection) {
  TORCH_CHECK(x.dim() == 2, "x must be [T, W], got ", shape_of(x));
  check_index_vector(eos_index, "eos_index", -1);
  const int64_t W = x.size(1);
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == W && ln_bias.dim() == 1 &&
                  ln_bias.size(0) == W,
              "ln_weight and ln_bias must be [", W, "]");
  TORCH_CHECK(projection.dim() == 2 && projection.size(0) == W, "projection must be [", W,
              ", E], got ", shape_of(projection));
}

}  // namespace hipro
