// The accumulation dtype of every hipro_fast op, written once for the CPU and
// CUDA backends.
//
// Scores, softmax statistics, LayerNorm statistics and gradient sums run in
// fp32 for fp32 / fp16 / bf16 inputs and in fp64 for fp64 inputs. That is
// exactly at::opmath_type<scalar_t>, the type the kernels accumulate in, so
// the host side derives the dtype of its buffers (lse, x_hat, gradient
// accumulators) from the same table rather than from a rule of its own that
// could drift from the kernels'. The fake (meta) registrations in
// hipro_fast/ops/interface.py (`_acc_dtype`) state the same rule in Python.
#pragma once

#include <ATen/OpMathType.h>

namespace hipro {

// Only meaningful for the floating dtypes the ops accept (the argument checks
// reject the others first).
inline at::ScalarType acc_scalar_type(at::ScalarType t) { return at::toOpMathType(t); }

}  // namespace hipro
