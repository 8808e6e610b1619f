// Sorted-expert MLP forward and backward with the experts spread over the intra-op threads: every thread
// takes a contiguous share of the expert-sorted assignment rows and runs its experts' blocks on its own
// (gather, matmul, activation, matmul, gate) with single-threaded kernels, so that one parallel region
// replaces the handful of thread hand-offs each op of each block would cost. Each share adds its rows into
// its own [N, C] accumulator; the accumulators are then summed in share order (deterministic for a given
// thread count, no atomics).
//
// Legend: N tokens, C width, E experts, M assignments (sorted by expert), H expert hidden width,
// Hin the first projection's width (2H for SwiGLU, H otherwise, C for linear).
#include "activation.h"
#include "fused_activation.h"
#include "segment_rows.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <numeric>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// At most this many shares (and so [N, C] accumulators) per call, however many threads: their memory stays
// within twice a dense FFN's hidden activations.
constexpr int64_t kMaxShares = 8;

// The rows [lo, hi) of one expert inside one thread's share.
struct Segment {
  int64_t expert, lo, hi;
  bool whole;  // the segment is all of the expert's rows
};

// Contiguous shares of M rows, one per thread, each cut at the expert boundaries it crosses.
std::vector<std::vector<Segment>> plan_shares(at::IntArrayRef counts, int64_t shares) {
  int64_t M = 0;
  for (auto n : counts) M += n;
  std::vector<std::vector<Segment>> plan(shares);
  std::vector<int64_t> starts(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) starts[e + 1] = starts[e] + counts[e];
  for (int64_t p = 0; p < shares; ++p) {
    int64_t lo = M * p / shares, hi = M * (p + 1) / shares;
    for (size_t e = 0; e < counts.size(); ++e) {
      int64_t a = std::max(lo, starts[e]), b = std::min(hi, starts[e + 1]);
      if (a < b) plan[p].push_back({(int64_t)e, a, b, a == starts[e] && b == starts[e + 1]});
    }
  }
  return plan;
}

int64_t share_count(int64_t M) {
  // a share below a few dozen rows costs more in hand-off than it saves
  return std::max<int64_t>(1, std::min<int64_t>({(int64_t)at::get_num_threads(), M / 32, kMaxShares}));
}

// fn(share, segment) for every segment of every share, one share per thread. A worker thread has its own
// thread-local state (grad and inference mode, dispatch keys): each takes the caller's.
template <typename Fn>
void for_each_segment(const std::vector<std::vector<Segment>>& plan, const Fn& fn) {
  const at::ThreadLocalState caller;
  at::parallel_for(0, (int64_t)plan.size(), 1, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard as_caller(caller);
    for (int64_t p = b; p < e; ++p)
      for (const auto& s : plan[p]) fn(p, s);
  });
}

// Every share adds its rows into its own [N, C] accumulator while they are still in cache (shares would race on a
// token's row in one accumulator); the accumulators are then summed in share order (deterministic).
// Each accumulator is zeroed by its own share's thread, on first use.
struct Accumulators {
  std::vector<at::Tensor> per_share;
  int64_t N, C;
  at::TensorOptions options;
  Accumulators(int64_t shares, int64_t N, int64_t C, const at::TensorOptions& options)
      : per_share(shares), N(N), C(C), options(options) {}
  // acc[tok[r]] += scale[r] * rows[r] for the segment's rows (scale null: 1)
  void add(int64_t share, const int64_t* tok, const at::Tensor& rows, const float* scale) {
    if (!per_share[share].defined()) per_share[share] = at::zeros({N, C}, options);
    moegpt::scatter_add_rows(per_share[share].data_ptr<float>(), rows.data_ptr<float>(), tok, scale, rows.size(0),
                             C);
  }
  at::Tensor sum() {
    std::vector<at::Tensor> used;
    for (const auto& t : per_share) if (t.defined()) used.push_back(t);
    if (used.empty()) return at::zeros({N, C}, options);
    auto out = used[0];
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      for (size_t p = 1; p < used.size(); ++p) {
        const float* src = used[p].data_ptr<float>();
        for (int64_t i = b * C; i < e * C; ++i) dst[i] += src[i];
      }
    });
    return out;
  }
};

// src[tok[r]] for the segment's rows.
at::Tensor gathered(const at::Tensor& src, const int64_t* tok, int64_t rows) {
  auto out = at::empty({rows, src.size(1)}, src.options());
  moegpt::gather_rows(out.data_ptr<float>(), src.data_ptr<float>(), tok, rows, src.size(1));
  return out;
}

// The activation of one segment's rows; GELU's is written into `kept`, its rows of the activation forward keeps
// for backward (its erf costs more to recompute than to keep).
at::Tensor activate(const at::Tensor& h, int64_t act, at::Tensor kept) {
  switch (act) {
    case kGelu: return at::gelu_out(kept, h);
    case kRelu: return at::relu(h);
    case kSwiglu: {
      const int64_t R = h.size(0), H = h.size(1) / 2;
      auto a = at::empty({R, H}, h.options());
      swiglu_forward_rows(h.data_ptr<float>(), h.stride(0), a.data_ptr<float>(), R, H);
      return a;
    }
    default: return h;
  }
}

// (a, dL/dh) of one segment's rows, and grad_gate[r] = sum_j a * grad_a; grad_a is dL/da before the gate.
// a_kept: GELU's activation rows, kept by forward.
std::pair<at::Tensor, at::Tensor> activation_backward(const at::Tensor& grad_a, const at::Tensor& h,
                                                      const at::Tensor& a_kept, const at::Tensor& gate,
                                                      int64_t act, at::Tensor& grad_gate) {
  const int64_t R = grad_a.size(0), H = grad_a.size(1);
  switch (act) {
    case kGelu: {
      auto grad_h = at::empty({R, H}, h.options());
      gelu_backward_rows(grad_a.data_ptr<float>(), h.data_ptr<float>(), h.stride(0), a_kept.data_ptr<float>(),
                         a_kept.stride(0), gate.data_ptr<float>(), grad_h.data_ptr<float>(),
                         grad_gate.data_ptr<float>(), R, H);
      return {a_kept, grad_h};
    }
    case kSwiglu: {
      auto a = at::empty({R, H}, h.options());
      auto grad_h = at::empty({R, 2 * H}, h.options());
      swiglu_backward_rows(grad_a.data_ptr<float>(), h.data_ptr<float>(), h.stride(0), gate.data_ptr<float>(),
                           a.data_ptr<float>(), grad_h.data_ptr<float>(), grad_gate.data_ptr<float>(), R, H);
      return {a, grad_h};
    }
    default: {  // ReLU
      auto a = at::relu(h);
      at::sum_out(grad_gate, a * grad_a, {1});
      return {a, grad_a * gate.unsqueeze(1) * (h > 0)};
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& tok, const at::Tensor& gate, at::IntArrayRef counts,
                  const at::Tensor& w_in, const c10::optional<at::Tensor>& w_out, int64_t act) {
  TORCH_CHECK(act >= kLinear && act <= kSwiglu, "unknown activation code ", act);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [N, C]");
  TORCH_CHECK(tok.dim() == 1 && tok.scalar_type() == at::kLong && tok.is_contiguous(), "tok: contiguous int64 [M]");
  const int64_t* t = tok.data_ptr<int64_t>();
  for (int64_t m = 0; m < tok.size(0); ++m)  // the segments' row loops index x and y by these unchecked
    TORCH_CHECK(t[m] >= 0 && t[m] < x.size(0), "tok: token index ", t[m], " out of range for ", x.size(0), " tokens");
  TORCH_CHECK(gate.sizes() == tok.sizes() && gate.scalar_type() == at::kFloat && gate.is_contiguous(),
              "gate: contiguous float32 [M]");
  TORCH_CHECK((int64_t)counts.size() == w_in.size(0), "counts: one per expert");
  TORCH_CHECK(std::accumulate(counts.begin(), counts.end(), int64_t{0}) == tok.size(0),
              "counts must add up to the assignments");
  TORCH_CHECK(w_in.dim() == 3 && w_in.size(1) == x.size(1) && w_in.scalar_type() == at::kFloat, "w_in: [E, C, Hin]");
  TORCH_CHECK((act == kLinear) == !w_out.has_value(), "w_out is absent exactly for the linear activation");
  if (w_out) {
    const int64_t H = act == kSwiglu ? w_in.size(2) / 2 : w_in.size(2);
    TORCH_CHECK(w_out->dim() == 3 && w_out->size(0) == w_in.size(0) && w_out->size(1) == H &&
                w_out->size(2) == x.size(1) && w_out->scalar_type() == at::kFloat, "w_out: [E, H, C]");
  } else {
    TORCH_CHECK(w_in.size(2) == x.size(1), "linear experts: w_in [E, C, C]");
  }
}

// (expert, dL/dw_in, dL/dw_out) of the rows of an expert that one share holds.
using Partial = std::tuple<int64_t, at::Tensor, at::Tensor>;

// Returns (y [N, C_out], h [M, Hin], and GELU's kept activation a [M, H], else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& tok,
                                                       const at::Tensor& gate, at::IntArrayRef counts,
                                                       const at::Tensor& w_in, const c10::optional<at::Tensor>& w_out,
                                                       int64_t act) {
  check_inputs(x, tok, gate, counts, w_in, w_out, act);
  const int64_t M = tok.size(0), N = x.size(0), Hin = w_in.size(2);
  const bool linear = act == kLinear;
  const int64_t H = act == kSwiglu ? Hin / 2 : Hin;
  const int64_t C_out = linear ? Hin : w_out->size(2);
  auto h = at::empty({M, Hin}, x.options());
  auto a_kept = act == kGelu ? at::empty({M, H}, x.options()) : at::Tensor();
  auto plan = plan_shares(counts, share_count(M));
  Accumulators y(plan.size(), N, C_out, x.options());
  const int64_t* tok_M = tok.data_ptr<int64_t>();
  const float* gate_M = gate.data_ptr<float>();
  for_each_segment(plan, [&](int64_t p, const Segment& s) {
    const int64_t rows = s.hi - s.lo;
    const int64_t* tok_s = tok_M + s.lo;
    auto h_s = h.narrow(0, s.lo, rows);
    at::mm_out(h_s, gathered(x, tok_s, rows), w_in[s.expert]);
    if (linear) {
      y.add(p, tok_s, h_s, gate_M + s.lo);
      return;
    }
    auto a = activate(h_s, act, a_kept.defined() ? a_kept.narrow(0, s.lo, rows) : a_kept);
    y.add(p, tok_s, at::mm(a, (*w_out)[s.expert]), gate_M + s.lo);
  });
  return {y.sum(), h, a_kept.defined() ? a_kept : at::empty({0}, x.options())};
}

// An expert cut between shares: the sum of its per-share partial gradients; an idle expert: zeros (whole
// experts were written in the region).
void finish_weight_grads(const std::vector<std::vector<Segment>>& plan,
                         const std::vector<std::vector<Partial>>& partial, at::Tensor& grad_w_in,
                         at::Tensor& grad_w_out) {
  std::vector<bool> written(grad_w_in.size(0), false);
  for (const auto& share : plan)
    for (const auto& s : share) if (s.whole) written[s.expert] = true;
  for (int64_t e = 0; e < grad_w_in.size(0); ++e) {
    if (written[e]) continue;
    grad_w_in[e].zero_();
    if (grad_w_out.defined()) grad_w_out[e].zero_();
  }
  for (const auto& share : partial)
    for (const auto& [e, dw_in, dw_out] : share) {
      grad_w_in[e].add_(dw_in);
      if (grad_w_out.defined()) grad_w_out[e].add_(dw_out);
    }
}

// Returns (grad_x [N, C], grad_gate [M], grad_w_in [E, C, Hin], grad_w_out [E, H, C] or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& tok, const at::Tensor& gate,
    at::IntArrayRef counts, const at::Tensor& w_in, const c10::optional<at::Tensor>& w_out, const at::Tensor& h,
    const at::Tensor& a_kept, int64_t act) {
  check_inputs(x, tok, gate, counts, w_in, w_out, act);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous(), "grad_y: contiguous [N, C]");
  TORCH_CHECK(act != kGelu || (a_kept.dim() == 2 && a_kept.size(0) == tok.size(0) && a_kept.size(1) == w_in.size(2)
                               && a_kept.is_contiguous() && a_kept.scalar_type() == at::kFloat),
              "a_kept: GELU's forward activation [M, H]");
  TORCH_CHECK(h.dim() == 2 && h.size(0) == tok.size(0) && h.size(1) == w_in.size(2) && h.is_contiguous() &&
                  h.scalar_type() == at::kFloat,
              "h: the forward's contiguous [M, Hin]");
  const int64_t M = tok.size(0), N = x.size(0), C = x.size(1);
  const bool linear = act == kLinear;
  auto plan = plan_shares(counts, share_count(M));
  auto grad_gate = at::empty({M}, x.options());
  Accumulators grad_x(plan.size(), N, C, x.options());
  auto grad_w_in = at::empty_like(w_in);
  auto grad_w_out = linear ? at::Tensor() : at::empty_like(*w_out);
  // an expert cut between two shares gets one partial gradient per share, summed after the region
  std::vector<std::vector<Partial>> partial(plan.size());
  const int64_t* tok_M = tok.data_ptr<int64_t>();
  const float* gate_M = gate.data_ptr<float>();
  for_each_segment(plan, [&](int64_t p, const Segment& s) {
    const int64_t rows = s.hi - s.lo;
    const int64_t* tok_s = tok_M + s.lo;
    auto h_s = h.narrow(0, s.lo, rows);
    auto grad_gate_s = grad_gate.narrow(0, s.lo, rows);
    // dL/d(expert output) and dL/d(expert output) * gate, the rows of grad_y
    auto g = at::empty({rows, C}, x.options()), weighted = at::empty({rows, C}, x.options());
    moegpt::gather_rows_scaled(g.data_ptr<float>(), weighted.data_ptr<float>(), grad_y.data_ptr<float>(), tok_s,
                               gate_M + s.lo, rows, C);
    at::Tensor grad_h, dw_out;
    if (linear) {
      at::sum_out(grad_gate_s, h_s * g, {1});
      grad_h = weighted;
    } else {
      auto grad_a = at::mm(g, (*w_out)[s.expert].t());
      auto a_kept_s = a_kept.numel() ? a_kept.narrow(0, s.lo, rows) : a_kept;
      at::Tensor a;
      std::tie(a, grad_h) =
          activation_backward(grad_a, h_s, a_kept_s, gate.narrow(0, s.lo, rows), act, grad_gate_s);
      if (s.whole) {
        auto slot = grad_w_out[s.expert];
        at::mm_out(slot, a.t(), weighted);
      } else {
        dw_out = at::mm(a.t(), weighted);
      }
    }
    auto x_s = gathered(x, tok_s, rows);
    if (s.whole) {
      auto slot = grad_w_in[s.expert];
      at::mm_out(slot, x_s.t(), grad_h);
    } else {
      partial[p].emplace_back(s.expert, at::mm(x_s.t(), grad_h), dw_out);
    }
    grad_x.add(p, tok_s, at::mm(grad_h, w_in[s.expert].t()), nullptr);
  });
  finish_weight_grads(plan, partial, grad_w_in, grad_w_out);
  return {grad_x.sum(), grad_gate, grad_w_in,
          linear ? at::empty({0}, x.options()) : grad_w_out};
}

// How many threads one parallel region of `shares` shares runs on: a build without OpenMP runs it on one.
int64_t region_threads(int64_t shares) {
  std::vector<std::thread::id> ids(shares);
  at::parallel_for(0, shares, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) ids[p] = std::this_thread::get_id();
  });
  std::sort(ids.begin(), ids.end());
  return std::unique(ids.begin(), ids.end()) - ids.begin();
}

}  // namespace

TORCH_LIBRARY(moegpt_native, m) {
  m.def("sorted_experts_forward(Tensor x, Tensor tok, Tensor gate, int[] counts, Tensor w_in, Tensor? w_out, "
        "int act) -> (Tensor, Tensor, Tensor)");
  m.def("region_threads(int shares) -> int");
  m.def("sorted_experts_backward(Tensor grad_y, Tensor x, Tensor tok, Tensor gate, int[] counts, Tensor w_in, "
        "Tensor? w_out, Tensor h, Tensor a_kept, int act) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moegpt_native, CompositeExplicitAutograd, m) {
  m.impl("region_threads", &region_threads);
}

TORCH_LIBRARY_IMPL(moegpt_native, CPU, m) {
  m.impl("sorted_experts_forward", &forward);
  m.impl("sorted_experts_backward", &backward);
}
