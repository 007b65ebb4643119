// Tree attention on the CPU. Each query token attends to its ancestor
// segments in full and to its own segment causally (see tree_index.h).
// Scores, softmax and accumulation run in opmath (fp32 for half types).
//
// q, k, v may be row-strided views (e.g. slices of the packed qkv GEMM
// output [T, 3, H, D]): only the [H, D] part of a row must be contiguous, so
// the forward needs no copies.
//
// Two paths share the work exactly (see ../attention_blocks.h, shared with
// the CUDA backend): the descendant
// queries of a segment with a large subtree (the context segments, which
// hold almost all visible pairs) attend to it through batched GEMMs; every
// other pair -- a token's own segment causally, and small ancestors -- runs
// in the scalar loops below. Partial softmax statistics merge by
// log-sum-exp; the order of merges is fixed, so results are deterministic.
//
// Before any index is read, checks.h validates the arguments (the checks the
// CUDA op runs too) and the forest (check_forest_values: the tree_index.h
// predicates that the CUDA validation kernel evaluates on the device).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../acc_type.h"
#include "../checks.h"
#include "../tree_index.h"
#include "../attention_blocks.h"

// On x86-64 the fp32 loops are also compiled for Haswell (AVX2 + FMA) and
// picked at load time, so a default -O3 build still runs 256-bit FMAs
// (flatten inlines the templated loops into each clone).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HIPRO_CPU_CLONES __attribute__((target_clones("arch=haswell", "default"), flatten))
#else
#define HIPRO_CPU_CLONES
#endif

namespace hipro {
namespace {

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  // Eight independent partial sums let the compiler vectorise the reduction.
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
  }
  for (; i < n; ++i) s[0] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename scalar_t, typename acc_t>
inline void axpy(acc_t alpha, const scalar_t* x, acc_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<acc_t>(x[i]);
}

// Spreads consecutive work items over the index space, so the heavy items
// (root-segment keys are seen by every query) land in different chunks of
// at::parallel_for's static split.
struct Strider {
  int64_t n, stride;
  explicit Strider(int64_t n_) : n(n_), stride(1) {
    static const int64_t primes[] = {7919, 7907, 7901, 7883, 7879};
    for (int64_t p : primes) {
      if (n > 0 && n % p != 0) {
        stride = p % n;
        break;
      }
    }
    if (stride == 0) stride = 1;
  }
  int64_t operator()(int64_t i) const { return (i * stride) % n; }
};

// Row-strided [T, H, D] view: element (t, h, d) at data[t * row + h * D + d].
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t row, H, D;
  const scalar_t* at(int64_t t, int64_t h) const { return data + t * row + h * D; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x) {
  return {x.data_ptr<scalar_t>(), x.stride(0), x.size(1), x.size(2)};
}

struct Forest {
  const int64_t* table;
  const int64_t* token_segment;
  // blocked[s] != 0: segment s's descendant queries attend to it through the
  // GEMM blocks (../attention_blocks.h), so the scalar loops skip those pairs.
  const uint8_t* blocked;
};

// The key ranges query t handles in the scalar loops: the residual of the
// block decomposition (residual_key_ranges in tree_index.h, the selection the
// CUDA kernels use too), root first.
inline int scalar_key_ranges(const Forest& f, int64_t t, int64_t* begins, int64_t* ends) {
  const int n = residual_key_ranges(f.table, f.blocked, f.token_segment[t], t, begins, ends,
                                    kMaxDepth);
  TORCH_CHECK(n >= 0, cat("forest deeper than ", kMaxDepth));
  return n;
}

// One past the last query that key j meets in the scalar loops.
inline int64_t scalar_query_end(const Forest& f, int64_t j) {
  return residual_query_end(f.table, f.blocked, f.token_segment[j]);
}

// Forward over the scalar key ranges: o (unnormalised, relative to m), m (max
// scaled score) and l (sum of exp(score - m)) per (token, head) item.
template <typename scalar_t, typename acc_t>
inline void forward_items(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, Forest f,
                          acc_t scale, acc_t* o, acc_t* m_out, acc_t* l_out, int64_t begin,
                          int64_t end) {
  const int64_t H = q.H, D = q.D;
  std::vector<acc_t> scores;
  int64_t begins[kMaxDepth], ends[kMaxDepth];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t t = item / H, h = item % H;
    const int nr = scalar_key_ranges(f, t, begins, ends);
    const scalar_t* qrow = q.at(t, h);
    scores.clear();
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int r = 0; r < nr; ++r) {
      for (int64_t j = begins[r]; j < ends[r]; ++j) {
        const acc_t s = dot<scalar_t, acc_t>(qrow, k.at(j, h), D) * scale;
        scores.push_back(s);
        m = s > m ? s : m;
      }
    }
    acc_t* acc = o + item * D;
    std::fill(acc, acc + D, acc_t(0));
    acc_t denom = 0;
    int64_t idx = 0;
    for (int r = 0; r < nr; ++r) {
      for (int64_t j = begins[r]; j < ends[r]; ++j, ++idx) {
        const acc_t p = std::exp(scores[idx] - m);
        denom += p;
        axpy<scalar_t, acc_t>(p, v.at(j, h), acc, D);
      }
    }
    m_out[item] = m;
    l_out[item] = denom;
  }
}

// dQ over the scalar key ranges (query-centric); written, not accumulated.
template <typename scalar_t, typename acc_t>
inline void grad_q_items(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, Forest f,
                         acc_t scale, const scalar_t* grad_out, const acc_t* lse,
                         const acc_t* delta, acc_t* dq, int64_t begin, int64_t end) {
  const int64_t H = q.H, D = q.D;
  int64_t begins[kMaxDepth], ends[kMaxDepth];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t t = item / H, h = item % H;
    const int nr = scalar_key_ranges(f, t, begins, ends);
    const scalar_t* qrow = q.at(t, h);
    const scalar_t* grow = grad_out + item * D;
    acc_t* acc = dq + item * D;
    std::fill(acc, acc + D, acc_t(0));
    for (int r = 0; r < nr; ++r) {
      for (int64_t j = begins[r]; j < ends[r]; ++j) {
        const scalar_t* krow = k.at(j, h);
        const acc_t p = std::exp(dot<scalar_t, acc_t>(qrow, krow, D) * scale - lse[item]);
        const acc_t dp = dot<scalar_t, acc_t>(grow, v.at(j, h), D);
        axpy<scalar_t, acc_t>(p * (dp - delta[item]) * scale, krow, acc, D);
      }
    }
  }
}

// dK, dV (key-centric): key j meets the queries [j, scalar_query_end(j)).
template <typename scalar_t, typename acc_t>
inline void grad_kv_items(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, Forest f,
                          acc_t scale, const scalar_t* grad_out, const acc_t* lse,
                          const acc_t* delta, acc_t* dk, acc_t* dv, Strider strider,
                          int64_t begin, int64_t end) {
  const int64_t H = q.H, D = q.D;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t item = strider(i);
    const int64_t j = item / H, h = item % H;
    const scalar_t* krow = k.at(j, h);
    const scalar_t* vrow = v.at(j, h);
    acc_t* acck = dk + item * D;
    acc_t* accv = dv + item * D;
    std::fill(acck, acck + D, acc_t(0));
    std::fill(accv, accv + D, acc_t(0));
    const int64_t qend = scalar_query_end(f, j);
    for (int64_t t = j; t < qend; ++t) {
      const int64_t qi = t * H + h;
      const scalar_t* qrow = q.at(t, h);
      const scalar_t* grow = grad_out + qi * D;
      const acc_t p = std::exp(dot<scalar_t, acc_t>(qrow, krow, D) * scale - lse[qi]);
      const acc_t dp = dot<scalar_t, acc_t>(grow, vrow, D);
      axpy<scalar_t, acc_t>(p, grow, accv, D);
      axpy<scalar_t, acc_t>(p * (dp - delta[qi]) * scale, qrow, acck, D);
    }
  }
}

// fp32 entry points compiled twice (see HIPRO_CPU_CLONES).
HIPRO_CPU_CLONES void forward_items_f32(Rows<float> q, Rows<float> k, Rows<float> v, Forest f,
                                        float scale, float* o, float* m, float* l, int64_t b,
                                        int64_t e) {
  forward_items<float, float>(q, k, v, f, scale, o, m, l, b, e);
}
HIPRO_CPU_CLONES void grad_q_items_f32(Rows<float> q, Rows<float> k, Rows<float> v, Forest f,
                                       float scale, const float* go, const float* lse,
                                       const float* delta, float* dq, int64_t b, int64_t e) {
  grad_q_items<float, float>(q, k, v, f, scale, go, lse, delta, dq, b, e);
}
HIPRO_CPU_CLONES void grad_kv_items_f32(Rows<float> q, Rows<float> k, Rows<float> v, Forest f,
                                        float scale, const float* go, const float* lse,
                                        const float* delta, float* dk, float* dv, Strider s,
                                        int64_t b, int64_t e) {
  grad_kv_items<float, float>(q, k, v, f, scale, go, lse, delta, dk, dv, s, b, e);
}

// Overloads: fp32 goes to the cloned entry points, other types to the templates.
template <typename scalar_t, typename acc_t>
void run_forward(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, Forest f, acc_t scale,
                 acc_t* o, acc_t* m, acc_t* l, int64_t b, int64_t e) {
  forward_items<scalar_t, acc_t>(q, k, v, f, scale, o, m, l, b, e);
}
void run_forward(Rows<float> q, Rows<float> k, Rows<float> v, Forest f, float scale, float* o,
                 float* m, float* l, int64_t b, int64_t e) {
  forward_items_f32(q, k, v, f, scale, o, m, l, b, e);
}
template <typename scalar_t, typename acc_t>
void run_grad_q(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, Forest f, acc_t scale,
                const scalar_t* go, const acc_t* lse, const acc_t* delta, acc_t* dq, int64_t b,
                int64_t e) {
  grad_q_items<scalar_t, acc_t>(q, k, v, f, scale, go, lse, delta, dq, b, e);
}
void run_grad_q(Rows<float> q, Rows<float> k, Rows<float> v, Forest f, float scale,
                const float* go, const float* lse, const float* delta, float* dq, int64_t b,
                int64_t e) {
  grad_q_items_f32(q, k, v, f, scale, go, lse, delta, dq, b, e);
}
template <typename scalar_t, typename acc_t>
void run_grad_kv(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, Forest f, acc_t scale,
                 const scalar_t* go, const acc_t* lse, const acc_t* delta, acc_t* dk,
                 acc_t* dv, Strider s, int64_t b, int64_t e) {
  grad_kv_items<scalar_t, acc_t>(q, k, v, f, scale, go, lse, delta, dk, dv, s, b, e);
}
void run_grad_kv(Rows<float> q, Rows<float> k, Rows<float> v, Forest f, float scale,
                 const float* go, const float* lse, const float* delta, float* dk, float* dv,
                 Strider s, int64_t b, int64_t e) {
  grad_kv_items_f32(q, k, v, f, scale, go, lse, delta, dk, dv, s, b, e);
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const at::Tensor& segment_table,
                                                      const at::Tensor& token_segment,
                                                      double scale) {
  // Computes in its documented precision even inside an autocast region: the
  // block GEMMs (attention_blocks.cpp) must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_attention_args(q, k, v, segment_table, token_segment);
  check_forest_values(segment_table, token_segment);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const auto acc = acc_scalar_type(q.scalar_type());
  const auto plan = attention_block_plan(segment_table, T, attention_block_min_pairs());
  // o (unnormalised), m, l per (token, head): the scalar loops write them, the
  // GEMM blocks merge into them, then one normalisation.
  auto o = at::empty({T, H, D}, q.options().dtype(acc));
  auto m = at::empty({T, H}, q.options().dtype(acc));
  auto l = at::empty({T, H}, q.options().dtype(acc));
  const Forest f{segment_table.data_ptr<int64_t>(), token_segment.data_ptr<int64_t>(),
                 plan->blocked.data()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto qr = rows_of<scalar_t>(q), kr = rows_of<scalar_t>(k), vr = rows_of<scalar_t>(v);
    acc_t* op = o.data_ptr<acc_t>();
    acc_t* mp = m.data_ptr<acc_t>();
    acc_t* lp = l.data_ptr<acc_t>();
    at::parallel_for(0, T * H, 32, [&](int64_t begin, int64_t end) {
      run_forward(qr, kr, vr, f, static_cast<acc_t>(scale), op, mp, lp, begin, end);
    });
  });
  attention_blocks_forward(*plan, q, k, v, scale, o, m, l);
  return attention_finalize(o, m, l, q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& segment_table,
    const at::Tensor& token_segment, double scale) {
  // Computes in its documented precision even inside an autocast region: the
  // block GEMMs (attention_blocks.cpp) must not be autocast to bf16 / fp16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_attention_backward_args(grad_out, q, k, v, out, lse, segment_table, token_segment);
  check_forest_values(segment_table, token_segment);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const auto acc = acc_scalar_type(q.scalar_type());
  const auto plan = attention_block_plan(segment_table, T, attention_block_min_pairs());
  const auto go = grad_out.contiguous().to(q.scalar_type());
  const auto o = out.contiguous().to(q.scalar_type());  // as the CUDA backward: out may come in another float dtype
  const auto lse_c = lse.contiguous().to(acc);
  auto dq = at::empty({T, H, D}, q.options().dtype(acc));
  auto dk = at::empty({T, H, D}, q.options().dtype(acc));
  auto dv = at::empty({T, H, D}, q.options().dtype(acc));
  auto delta = at::empty({T, H}, q.options().dtype(acc));
  const Forest f{segment_table.data_ptr<int64_t>(), token_segment.data_ptr<int64_t>(),
                 plan->blocked.data()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto qr = rows_of<scalar_t>(q), kr = rows_of<scalar_t>(k), vr = rows_of<scalar_t>(v);
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* opp = o.data_ptr<scalar_t>();
    const acc_t* lp = lse_c.data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    acc_t* dqp = dq.data_ptr<acc_t>();
    acc_t* dkp = dk.data_ptr<acc_t>();
    acc_t* dvp = dv.data_ptr<acc_t>();
    acc_t* dp = delta.data_ptr<acc_t>();
    // delta[t, h] = dO . O, the softmax-backward row term.
    at::parallel_for(0, T * H, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dp[i] = dot<scalar_t, acc_t>(gp + i * D, opp + i * D, D);
    });
    at::parallel_for(0, T * H, 32, [&](int64_t begin, int64_t end) {
      run_grad_q(qr, kr, vr, f, sc, gp, lp, dp, dqp, begin, end);
    });
    const Strider strider(T * H);
    at::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
      run_grad_kv(qr, kr, vr, f, sc, gp, lp, dp, dkp, dvp, strider, begin, end);
    });
  });
  attention_blocks_backward(*plan, q, k, v, go, lse_c, delta, scale, dq, dk, dv);
  const auto st = q.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hipro_fast, CPU, m) {
  m.impl("tree_attention", &tree_attention_cpu);
  m.impl("tree_attention_backward", &tree_attention_backward_cpu);
}

}  // namespace hipro
