// Argument checks shared by the CPU and CUDA op implementations.
//
// Defined once in checks.cpp (compiled by the host compiler only) rather than
// inline here: the CUDA files call them too, and on a GPU machine a failing
// inline check compiled into an nvcc translation unit crashed the process
// (a shape-mismatch TORCH_CHECK whose message streams IntArrayRef) instead of
// raising. Messages in .cu files format shapes through shape_of() for the
// same reason.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/ATen.h>

#include <string>

#include "tree_index.h"

namespace hipro {

// "[T, H, D]": a tensor's shape as text, for error messages.
std::string shape_of(const at::Tensor& t);
std::string strides_of(const at::Tensor& t);

void check_index_vector(const at::Tensor& t, const char* name, int64_t numel);
void check_segment_table(const at::Tensor& table, int64_t num_tokens);
// q, k, v may be row-strided (e.g. slices of a packed [T, 3, H, D] qkv GEMM
// output): only each token's [H, D] block must be contiguous.
void check_inner_contiguous(const at::Tensor& x, const char* name);
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
// Shapes of pool_eos's arguments (device and value checks are per backend).
void check_pool_shapes(const at::Tensor& x, const at::Tensor& eos_index,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                       const at::Tensor& projection);

}  // namespace hipro
