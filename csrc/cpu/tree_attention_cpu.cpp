// Tree attention on the CPU. Each query token attends to its ancestor
// segments in full and to its own segment causally (see tree_index.h).
// Scores, softmax and accumulation run in opmath (fp32 for half types).
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../tree_index.h"

namespace hipro {
namespace {

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  // Four independent partial sums let the compiler vectorise the loop.
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
    s1 += static_cast<acc_t>(a[i + 1]) * static_cast<acc_t>(b[i + 1]);
    s2 += static_cast<acc_t>(a[i + 2]) * static_cast<acc_t>(b[i + 2]);
    s3 += static_cast<acc_t>(a[i + 3]) * static_cast<acc_t>(b[i + 3]);
  }
  for (; i < n; ++i) s0 += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return (s0 + s1) + (s2 + s3);
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
      if (n % p != 0) { stride = p % (n > 0 ? n : 1); break; }
    }
    if (stride == 0) stride = 1;
  }
  int64_t operator()(int64_t i) const { return (i * stride) % n; }
};

void check_tokens(const at::Tensor& segment_table, const at::Tensor& token_segment, int64_t T) {
  check_segment_table(segment_table, T);
  check_index_vector(token_segment, "token_segment", T);
  const int64_t S = segment_table.size(0);
  const int64_t* tab = segment_table.data_ptr<int64_t>();
  const int64_t* tseg = token_segment.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = tseg[t];
    TORCH_CHECK(s >= 0 && s < S, "token ", t, " names segment ", s, " outside [0, ", S, ")");
    TORCH_CHECK(t >= seg_offset(tab, s) && t < seg_offset(tab, s) + seg_length(tab, s),
                "token ", t, " lies outside its segment ", s);
  }
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(seg_parent(tab, s) < s, "segment ", s, " has parent ", seg_parent(tab, s),
                " which is not earlier in DFS preorder");
    TORCH_CHECK(seg_subtree_end(tab, s) <= T, "segment ", s, " subtree ends past token ", T);
  }
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const at::Tensor& segment_table,
                                                      const at::Tensor& token_segment,
                                                      double scale) {
  check_qkv(q, k, v);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  check_tokens(segment_table, token_segment, T);
  auto out = at::empty_like(q);
  auto lse = at::empty({T, H}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble
                                                                                 : at::kFloat));
  const int64_t* tab = segment_table.data_ptr<int64_t>();
  const int64_t* tseg = token_segment.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* lp = lse.data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    at::parallel_for(0, T * H, 32, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scores;
      std::vector<acc_t> acc(D);
      int64_t begins[kMaxDepth], ends[kMaxDepth];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / H, h = item % H;
        const int64_t seg = tseg[t];
        const int nr = visible_key_ranges(tab, seg, t, begins, ends, kMaxDepth);
        const scalar_t* qrow = qp + (t * H + h) * D;
        scores.clear();
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int r = 0; r < nr; ++r) {
          for (int64_t j = begins[r]; j < ends[r]; ++j) {
            const acc_t s = dot<scalar_t, acc_t>(qrow, kp + (j * H + h) * D, D) * sc;
            scores.push_back(s);
            m = s > m ? s : m;
          }
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t denom = 0;
        int64_t idx = 0;
        for (int r = 0; r < nr; ++r) {
          for (int64_t j = begins[r]; j < ends[r]; ++j, ++idx) {
            const acc_t p = std::exp(scores[idx] - m);
            denom += p;
            axpy<scalar_t, acc_t>(p, vp + (j * H + h) * D, acc.data(), D);
          }
        }
        scalar_t* orow = op + (t * H + h) * D;
        const acc_t inv = acc_t(1) / denom;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(acc[d] * inv);
        lp[t * H + h] = m + std::log(denom);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& segment_table,
    const at::Tensor& token_segment, double scale) {
  check_qkv(q, k, v);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  check_tokens(segment_table, token_segment, T);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({T, H}), "lse must be [T, H]");
  const auto go = grad_out.contiguous().to(q.scalar_type());
  const auto o = out.contiguous();
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  const int64_t* tab = segment_table.data_ptr<int64_t>();
  const int64_t* tseg = token_segment.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto lse_c = lse.contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* opp = o.data_ptr<scalar_t>();
    const acc_t* lp = lse_c.data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    // delta[t, h] = dO . O, the softmax-backward row term.
    std::vector<acc_t> delta(T * H);
    at::parallel_for(0, T * H, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) delta[i] = dot<scalar_t, acc_t>(gp + i * D, opp + i * D, D);
    });
    // dQ: query-centric over the visible keys.
    at::parallel_for(0, T * H, 32, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(D);
      int64_t begins[kMaxDepth], ends[kMaxDepth];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / H, h = item % H;
        const int nr = visible_key_ranges(tab, tseg[t], t, begins, ends, kMaxDepth);
        const scalar_t* qrow = qp + item * D;
        const scalar_t* grow = gp + item * D;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int r = 0; r < nr; ++r) {
          for (int64_t j = begins[r]; j < ends[r]; ++j) {
            const scalar_t* krow = kp + (j * H + h) * D;
            const acc_t p = std::exp(dot<scalar_t, acc_t>(qrow, krow, D) * sc - lp[item]);
            const acc_t dp = dot<scalar_t, acc_t>(grow, vp + (j * H + h) * D, D);
            axpy<scalar_t, acc_t>(p * (dp - delta[item]) * sc, krow, acc.data(), D);
          }
        }
        scalar_t* dst = dq.data_ptr<scalar_t>() + item * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
      }
    });
    // dK, dV: key-centric; key j is seen by queries [j, subtree_end(seg(j))).
    const Strider strider(T * H);
    at::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acck(D), accv(D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t item = strider(i);
        const int64_t j = item / H, h = item % H;
        const scalar_t* krow = kp + item * D;
        const scalar_t* vrow = vp + item * D;
        std::fill(acck.begin(), acck.end(), acc_t(0));
        std::fill(accv.begin(), accv.end(), acc_t(0));
        const int64_t qend = visible_query_end(tab, tseg[j]);
        for (int64_t t = j; t < qend; ++t) {
          const int64_t qi = t * H + h;
          const scalar_t* qrow = qp + qi * D;
          const scalar_t* grow = gp + qi * D;
          const acc_t p = std::exp(dot<scalar_t, acc_t>(qrow, krow, D) * sc - lp[qi]);
          const acc_t dp = dot<scalar_t, acc_t>(grow, vrow, D);
          axpy<scalar_t, acc_t>(p, grow, accv.data(), D);
          axpy<scalar_t, acc_t>(p * (dp - delta[qi]) * sc, qrow, acck.data(), D);
        }
        scalar_t* dkr = dk.data_ptr<scalar_t>() + item * D;
        scalar_t* dvr = dv.data_ptr<scalar_t>() + item * D;
        for (int64_t d = 0; d < D; ++d) {
          dkr[d] = static_cast<scalar_t>(acck[d]);
          dvr[d] = static_cast<scalar_t>(accv[d]);
        }
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(hipro_fast, CPU, m) {
  m.impl("tree_attention", &tree_attention_cpu);
  m.impl("tree_attention_backward", &tree_attention_backward_cpu);
}

}  // namespace hipro
