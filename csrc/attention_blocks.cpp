// The segment-block decomposition of tree attention; see attention_blocks.h.
// Host code only (the host compiler builds it for both backends): on CUDA
// tensors every at:: call below is a cuBLAS GEMM or an ATen kernel launch.
#include "attention_blocks.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <tuple>

#include "acc_type.h"
#include "checks.h"
#include "tree_index.h"

namespace hipro {
namespace {

std::atomic<int64_t> g_block_min_pairs{256};
std::atomic<int64_t> g_block_grouping{static_cast<int64_t>(BlockGrouping::kAuto)};

// [H, n, D] view of rows [begin, begin + n) of a [T, H, D] tensor.
at::Tensor heads_first(const at::Tensor& x, int64_t begin, int64_t n) {
  return x.narrow(0, begin, n).transpose(0, 1);
}

at::Tensor long_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong));
  if (!v.empty()) std::memcpy(t.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return device.is_cpu() ? t : t.to(device);
}

// Groups the plan's blocks (see AttentionBlockGroup): by (depth, keys), then
// largest first, a member joining while it has at least half the group's rows.
void group_blocks(const int64_t* table, int64_t num_segments, const at::Device& device,
                  AttentionBlockPlan& plan, bool group) {
  if (!group) {  // one block per group, in preorder
    for (size_t i = 0; i < plan.blocks.size(); ++i) {
      AttentionBlockGroup g;
      g.keys = plan.blocks[i].keys;
      g.rows = plan.blocks[i].rows;
      g.members.push_back(static_cast<int64_t>(i));
      plan.groups.push_back(std::move(g));
    }
    return;
  }
  std::vector<int64_t> depth(static_cast<size_t>(num_segments), 0);
  for (int64_t s = 0; s < num_segments; ++s) {  // parents come earlier (validated)
    const int64_t p = seg_parent(table, s);
    depth[s] = p < 0 ? 0 : depth[p] + 1;
  }
  std::vector<int64_t> order(plan.blocks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  auto key = [&](int64_t i) {
    const AttentionBlock& b = plan.blocks[i];
    return std::make_tuple(depth[b.segment], b.keys, -b.rows, b.segment);
  };
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
  for (const int64_t i : order) {
    const AttentionBlock& b = plan.blocks[i];
    AttentionBlockGroup* last = plan.groups.empty() ? nullptr : &plan.groups.back();
    if (last && last->depth == depth[b.segment] && last->keys == b.keys && 2 * b.rows >= last->rows) {
      last->members.push_back(i);
      continue;
    }
    AttentionBlockGroup g;
    g.depth = depth[b.segment];
    g.keys = b.keys;
    g.rows = b.rows;  // the largest: members come in decreasing rows
    g.members.push_back(i);
    plan.groups.push_back(std::move(g));
  }
  for (AttentionBlockGroup& g : plan.groups) {
    if (g.members.size() < 2) continue;
    const int64_t G = static_cast<int64_t>(g.members.size()), n = g.rows;
    std::vector<int64_t> rows(static_cast<size_t>(G * n)), keys, valid_pos, valid_rows;
    std::vector<uint8_t> pad(static_cast<size_t>(G * n), 0);
    for (int64_t gi = 0; gi < G; ++gi) {
      const AttentionBlock& b = plan.blocks[g.members[gi]];
      for (int64_t i = 0; i < n; ++i) {
        const bool real = i < b.rows;
        rows[gi * n + i] = b.row_begin + (real ? i : 0);
        pad[gi * n + i] = real ? 0 : 1;
        if (real) {
          valid_pos.push_back(gi * n + i);
          valid_rows.push_back(b.row_begin + i);
        }
      }
      for (int64_t j = 0; j < b.keys; ++j) keys.push_back(b.key_begin + j);
    }
    g.row_index = long_tensor(rows, device);
    g.key_index = long_tensor(keys, device);
    g.valid_rows = long_tensor(valid_rows, device);
    if (static_cast<int64_t>(valid_rows.size()) < G * n) {
      g.valid_pos = long_tensor(valid_pos, device);
      auto mask = at::empty({G, 1, n, 1}, at::TensorOptions().dtype(at::kBool));
      std::memcpy(mask.data_ptr<bool>(), pad.data(), pad.size());
      g.pad = device.is_cpu() ? mask : mask.to(device);
    }
  }
}

// Rows of x [T, H, ...] at `index` ([G * n]) as [G * H, n, ...] (heads first).
at::Tensor gather_heads(const at::Tensor& x, const at::Tensor& index, int64_t G, int64_t n) {
  const int64_t H = x.size(1);
  std::vector<int64_t> grouped = {G, n, H}, flat = {G * H, n};
  for (int64_t d = 2; d < x.dim(); ++d) {
    grouped.push_back(x.size(d));
    flat.push_back(x.size(d));
  }
  return x.index_select(0, index).view(grouped).transpose(1, 2).reshape(flat);
}

// The inverse layout change: [G * H, n, ...] -> [G * n, H, ...] (rows first).
at::Tensor rows_first(const at::Tensor& y, int64_t G, int64_t H) {
  const int64_t n = y.size(1);
  std::vector<int64_t> grouped = {G, H, n}, flat = {G * n, H};
  for (int64_t d = 2; d < y.dim(); ++d) {
    grouped.push_back(y.size(d));
    flat.push_back(y.size(d));
  }
  return y.view(grouped).transpose(1, 2).reshape(flat);
}

// dst[real rows of the group] = the real positions of y ([G * H, n, ...]).
void scatter_rows(at::Tensor& dst, const at::Tensor& y, const AttentionBlockGroup& g, int64_t H) {
  auto r = rows_first(y, static_cast<int64_t>(g.members.size()), H);
  if (g.valid_pos.defined()) r = r.index_select(0, g.valid_pos);
  dst.index_copy_(0, g.valid_rows, r);
}

// dst[real rows of the group] += the real positions of y ([G * H, n, ...]).
void scatter_rows_add(at::Tensor& dst, const at::Tensor& y, const AttentionBlockGroup& g,
                      int64_t H) {
  auto r = rows_first(y, static_cast<int64_t>(g.members.size()), H);
  if (g.valid_pos.defined()) r = r.index_select(0, g.valid_pos);
  dst.index_copy_(0, g.valid_rows, dst.index_select(0, g.valid_rows).add_(r));
}

// dst[index] += y ([G * H, L, ...]); the indices are distinct, and select + add
// + copy (rather than index_add_) keeps it deterministic on every device.
void add_rows(at::Tensor& dst, const at::Tensor& index, const at::Tensor& y, int64_t G, int64_t H) {
  dst.index_copy_(0, index, dst.index_select(0, index).add_(rows_first(y, G, H)));
}

// a @ b (batched) with the product in `acc`: a, b in the inputs' dtype, or a
// already in `acc` (fp16's dS; see "Precision" in attention_blocks.h).
at::Tensor block_gemm(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::bmm(a, b.to(acc));  // b may be a half operand (fp16 dS)
  if (a.is_cuda()) return at::bmm(a, b, acc);  // half operands on tensor cores, fp32 result
  return at::bmm(a.to(acc), b.to(acc));        // the same products, exact in fp32
}

// ---------------------------------------------------------------------------
// Plan cache. Small (plans are reused for one forest at a time, a handful of
// forests per process) and intentionally leaked: it may hold CUDA tensors,
// which must not be freed by a static destructor after the CUDA runtime has
// shut down.

struct CacheEntry {
  at::Tensor table;            // keeps the storage (and so its address) alive
  const void* data;
  int64_t rows, num_tokens, min_pairs, version;
  bool group;
  c10::Device device;
  std::vector<int64_t> host;   // the table's contents when planned
  std::shared_ptr<const AttentionBlockPlan> plan;
};

// Entries whose table nobody else holds go first (least recently used
// first); entries of live tables are kept up to kMaxCacheEntries. A plan used
// in a CUDA graph capture outlives its entry (retain_plan_for_graph_replay).
constexpr size_t kCacheEntries = 16;
constexpr size_t kMaxCacheEntries = 256;

struct PlanCache {
  std::mutex mutex;
  std::vector<CacheEntry> entries;  // least recently used first
  AttentionPlanCacheStats stats;
};

PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache();  // leaked on purpose, see above
  return *cache;
}

std::shared_ptr<const AttentionBlockPlan> plan_from_host(const std::vector<int64_t>& host,
                                                         int64_t rows, int64_t num_tokens,
                                                         int64_t min_pairs,
                                                         const at::Device& device, bool group) {
  check_segment_rows(host.data(), rows, num_tokens);
  return std::make_shared<const AttentionBlockPlan>(
      plan_attention_blocks(host.data(), rows, min_pairs, device, group));
}

struct GraphReplayPlans {
  std::mutex mutex;
  std::vector<std::shared_ptr<const AttentionBlockPlan>> plans;
};

GraphReplayPlans& graph_replay_plans() {
  static GraphReplayPlans* kept = new GraphReplayPlans();  // leaked on purpose, as the cache
  return *kept;
}

}  // namespace

size_t retain_plan_for_graph_replay(std::shared_ptr<const AttentionBlockPlan> plan) {
  GraphReplayPlans& kept = graph_replay_plans();
  std::lock_guard<std::mutex> lock(kept.mutex);
  if (std::find(kept.plans.begin(), kept.plans.end(), plan) == kept.plans.end()) {
    kept.plans.push_back(std::move(plan));
  }
  return kept.plans.size();
}

int64_t attention_block_min_pairs() { return g_block_min_pairs.load(); }

BlockGrouping attention_block_grouping() {
  return static_cast<BlockGrouping>(g_block_grouping.load());
}

void set_attention_block_grouping(BlockGrouping mode) {
  const auto m = static_cast<int64_t>(mode);
  TORCH_CHECK(m >= 0 && m <= 2, cat("block grouping must be 0 (never), 1 (auto) or 2 (always), got ", m));
  g_block_grouping.store(m);
}

void set_attention_block_min_pairs(int64_t min_pairs) {
  TORCH_CHECK(min_pairs >= 0, cat("min_pairs must be >= 0, got ", min_pairs));
  g_block_min_pairs.store(min_pairs);
}

AttentionBlockPlan plan_attention_blocks(const int64_t* table, int64_t num_segments,
                                         int64_t min_pairs, const at::Device& device,
                                         bool group) {
  AttentionBlockPlan plan;
  plan.min_pairs = min_pairs;
  plan.blocked.assign(static_cast<size_t>(num_segments), 0);
  for (int64_t s = 0; s < num_segments; ++s) {
    if (!segment_blocked(table, s, min_pairs)) continue;
    plan.blocked[static_cast<size_t>(s)] = 1;
    plan.blocks.push_back({s, seg_offset(table, s), seg_length(table, s),
                           block_row_begin(table, s), block_rows(table, s)});
  }
  group_blocks(table, num_segments, device, plan, group);
  auto flags = at::empty({num_segments}, at::TensorOptions().dtype(at::kByte));
  if (num_segments > 0) {
    std::memcpy(flags.data_ptr<uint8_t>(), plan.blocked.data(), plan.blocked.size());
  }
  plan.blocked_flags = device.is_cpu() ? flags : flags.to(device);
  return plan;
}

std::shared_ptr<const AttentionBlockPlan> attention_block_plan(const at::Tensor& segment_table,
                                                               int64_t num_tokens,
                                                               int64_t min_pairs) {
  const int64_t rows = segment_table.size(0);
  const bool on_host = segment_table.is_cpu();
  auto host_copy = [&] {
    const auto t = on_host ? segment_table.contiguous() : segment_table.to(at::kCPU).contiguous();
    return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
  };
  const auto grouping = attention_block_grouping();
  const bool group = grouping == BlockGrouping::kAlways ||
                     (grouping == BlockGrouping::kAuto && !segment_table.is_cpu());
  PlanCache& cache = plan_cache();
  if (segment_table.is_inference()) {  // no version counter: cannot tell a modified table
    {
      std::lock_guard<std::mutex> lock(cache.mutex);
      ++cache.stats.misses;
    }
    return plan_from_host(host_copy(), rows, num_tokens, min_pairs, segment_table.device(), group);
  }
  const int64_t version =
      static_cast<int64_t>(segment_table.unsafeGetTensorImpl()->version_counter().current_version());
  const void* data = segment_table.data_ptr();
  std::lock_guard<std::mutex> lock(cache.mutex);
  for (size_t i = 0; i < cache.entries.size(); ++i) {
    const CacheEntry& e = cache.entries[i];
    if (e.data != data || e.rows != rows || e.num_tokens != num_tokens ||
        e.min_pairs != min_pairs || e.version != version || e.group != group ||
        e.device != segment_table.device()) {
      continue;
    }
    // A host table is cheap to compare, so a write the version counter missed
    // (e.g. through numpy) cannot return a stale plan on the CPU.
    if (on_host && std::memcmp(e.host.data(), segment_table.contiguous().data_ptr<int64_t>(),
                               e.host.size() * sizeof(int64_t)) != 0) {
      continue;
    }
    ++cache.stats.hits;
    CacheEntry hit = std::move(cache.entries[i]);
    cache.entries.erase(cache.entries.begin() + static_cast<std::ptrdiff_t>(i));
    cache.entries.push_back(std::move(hit));
    return cache.entries.back().plan;
  }
  ++cache.stats.misses;
  auto host = host_copy();
  auto plan = plan_from_host(host, rows, num_tokens, min_pairs, segment_table.device(), group);
  if (cache.entries.size() >= kCacheEntries) {
    auto victim = std::find_if(cache.entries.begin(), cache.entries.end(),
                               [](const CacheEntry& e) { return e.table.use_count() == 1; });
    if (victim != cache.entries.end()) {
      cache.entries.erase(victim);
    } else if (cache.entries.size() >= kMaxCacheEntries) {
      cache.entries.erase(cache.entries.begin());
    }
  }
  cache.entries.push_back(CacheEntry{segment_table, data, rows, num_tokens, min_pairs, version,
                                     group, segment_table.device(), std::move(host), plan});
  return plan;
}

AttentionPlanCacheStats attention_plan_cache_stats() {
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return cache.stats;
}

namespace {

// Merges one block's (or one group's) statistics into the running (o, m, l)
// rows given as mr, lr [B, n], orow [B, n, D]; returns nothing, updates them.
void lse_merge(at::Tensor& orow, at::Tensor& mr, at::Tensor& lr, const at::Tensor& block_max,
               at::Tensor& block_sum, at::Tensor& block_out) {
  const auto new_max = at::maximum(mr, block_max);
  const auto keep = (mr - new_max).exp_();
  const auto take = (block_max - new_max).exp_();
  orow.mul_(keep.unsqueeze(2)).add_(block_out.mul_(take.unsqueeze(2)));
  lr.mul_(keep).add_(block_sum.mul_(take));
  mr.copy_(new_max);
}

// Softmax statistics of scores [B, n, L] (consumed): (max, sum, P @ V).
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_softmax(at::Tensor scores, const at::Tensor& vs,
                                                             at::ScalarType operand,
                                                             at::ScalarType acc) {
  auto block_max = std::get<0>(scores.max(2));                       // [B, n]
  const auto p = scores.sub_(block_max.unsqueeze(2)).exp_();
  auto block_sum = p.sum(2);
  auto block_out = block_gemm(p.to(operand), vs, acc);               // [B, n, D]
  return {block_max, block_sum, block_out};
}

}  // namespace

void attention_blocks_forward(const AttentionBlockPlan& plan, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, double scale,
                              at::Tensor& o, at::Tensor& m, at::Tensor& l) {
  const auto acc = o.scalar_type();
  const auto operand = q.scalar_type();
  const int64_t H = q.size(1);
  for (const AttentionBlockGroup& g : plan.groups) {
    if (g.members.size() == 1) {  // views, no gathers
      const AttentionBlock& b = plan.blocks[g.members[0]];
      const auto qr = heads_first(q, b.row_begin, b.rows);   // [H, n, D]
      const auto ks = heads_first(k, b.key_begin, b.keys);   // [H, L, D]
      const auto vs = heads_first(v, b.key_begin, b.keys);
      auto [bmax, bsum, bout] =
          block_softmax(block_gemm(qr, ks.transpose(1, 2), acc).mul_(scale), vs, operand, acc);
      // Views of the running statistics: the merge writes through.
      auto mr = heads_first(m, b.row_begin, b.rows);
      auto lr = heads_first(l, b.row_begin, b.rows);
      auto orow = heads_first(o, b.row_begin, b.rows);
      lse_merge(orow, mr, lr, bmax, bsum, bout);
      continue;
    }
    const int64_t G = static_cast<int64_t>(g.members.size()), n = g.rows, L = g.keys;
    const auto qg = gather_heads(q, g.row_index, G, n);      // [G * H, n, D]
    const auto kg = gather_heads(k, g.key_index, G, L);      // [G * H, L, D]
    const auto vg = gather_heads(v, g.key_index, G, L);
    auto [bmax, bsum, bout] =
        block_softmax(block_gemm(qg, kg.transpose(1, 2), acc).mul_(scale), vg, operand, acc);
    auto mr = gather_heads(m, g.row_index, G, n);            // copies: merged, then scattered
    auto lr = gather_heads(l, g.row_index, G, n);
    auto orow = gather_heads(o, g.row_index, G, n);
    lse_merge(orow, mr, lr, bmax, bsum, bout);
    scatter_rows(m, mr, g, H);
    scatter_rows(l, lr, g, H);
    scatter_rows(o, orow, g, H);
  }
}

std::tuple<at::Tensor, at::Tensor> attention_finalize(const at::Tensor& o, const at::Tensor& m,
                                                      const at::Tensor& l, at::ScalarType dtype) {
  auto out = (o / l.unsqueeze(2)).to(dtype);
  auto lse = m + l.log();
  return {out, lse};
}

void attention_blocks_backward(const AttentionBlockPlan& plan, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& grad_out, const at::Tensor& lse,
                               const at::Tensor& delta, double scale, at::Tensor& dq,
                               at::Tensor& dk, at::Tensor& dv) {
  const auto acc = dq.scalar_type();
  const auto operand = q.scalar_type();
  // dS = P * (dP - delta) * scale stays in the accumulation dtype for fp16:
  // it can exceed fp16's range (65504) where dQ = dS K and dK = dS^T Q do not,
  // and an inf dS times a zero key gives NaN. The per-row path and the
  // reference keep it in fp32 too. bf16 has fp32's exponent range, so there
  // dS goes to the tensor cores in bf16.
  const auto ds_dtype = operand == at::kHalf ? acc : operand;
  const int64_t H = q.size(1);
  // P and dS of one block or group ([B, n, L]), from its gathered rows / keys.
  auto probs = [&](const at::Tensor& qr, const at::Tensor& ks, const at::Tensor& lse_r) {
    return block_gemm(qr, ks.transpose(1, 2), acc).mul_(scale).sub_(lse_r.unsqueeze(2)).exp_();
  };
  auto score_grad = [&](const at::Tensor& p, const at::Tensor& gr, const at::Tensor& vs,
                        const at::Tensor& delta_r) {
    return block_gemm(gr, vs.transpose(1, 2), acc)
        .sub_(delta_r.unsqueeze(2))
        .mul_(p)
        .mul_(scale)
        .to(ds_dtype);
  };
  for (const AttentionBlockGroup& g : plan.groups) {
    if (g.members.size() == 1) {  // views, no gathers
      const AttentionBlock& b = plan.blocks[g.members[0]];
      const auto qr = heads_first(q, b.row_begin, b.rows);          // [H, n, D]
      const auto gr = heads_first(grad_out, b.row_begin, b.rows);   // [H, n, D]
      const auto ks = heads_first(k, b.key_begin, b.keys);          // [H, L, D]
      const auto vs = heads_first(v, b.key_begin, b.keys);
      const auto p = probs(qr, ks, heads_first(lse, b.row_begin, b.rows));  // [H, n, L]
      heads_first(dv, b.key_begin, b.keys).add_(block_gemm(p.to(operand).transpose(1, 2), gr, acc));
      const auto ds = score_grad(p, gr, vs, heads_first(delta, b.row_begin, b.rows));
      heads_first(dq, b.row_begin, b.rows).add_(block_gemm(ds, ks, acc));
      heads_first(dk, b.key_begin, b.keys).add_(block_gemm(ds.transpose(1, 2), qr, acc));
      continue;
    }
    const int64_t G = static_cast<int64_t>(g.members.size()), n = g.rows, L = g.keys;
    const auto qg = gather_heads(q, g.row_index, G, n);            // [G * H, n, D]
    const auto gg = gather_heads(grad_out, g.row_index, G, n);
    const auto kg = gather_heads(k, g.key_index, G, L);            // [G * H, L, D]
    const auto vg = gather_heads(v, g.key_index, G, L);
    auto p = probs(qg, kg, gather_heads(lse, g.row_index, G, n));  // [G * H, n, L]
    if (g.pad.defined()) {  // padded positions repeat real rows: they must add nothing
      p.view({G, H, n, L}).masked_fill_(g.pad, 0);
    }
    add_rows(dv, g.key_index, block_gemm(p.to(operand).transpose(1, 2), gg, acc), G, H);
    const auto ds = score_grad(p, gg, vg, gather_heads(delta, g.row_index, G, n));
    scatter_rows_add(dq, block_gemm(ds, kg, acc), g, H);
    add_rows(dk, g.key_index, block_gemm(ds.transpose(1, 2), qg, acc), G, H);
  }
}

}  // namespace hipro
