// Decode: residual[n] += sum over choices j (idx[n, j] >= 0) of gate[n, j] * expert_{idx[n, j]}(x[n]), for the
// few rows of one generated token, in plain loops: per chosen expert the ops (two products, activation, gated
// add) cost more to dispatch than to compute at one row.
//
// At one row the products are bound by how fast one core streams the chosen experts' weights from memory, so
// a call may `split` them with the helper thread (helper_thread.cpp; the caller decides: the weights must be
// large enough to repay the hand-off): each thread takes half of every chosen expert's hidden units.
//
// Legend: N rows (sequences), K choices per row, C width, E experts, H expert hidden width, Hin the first
// projection's width (2H for SwiGLU, H otherwise, C for linear).
#include "activation.h"
#include "decode_rows.h"
#include "helper_thread.h"
#include "inplace.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using moegpt::add_rows;

float activate_one(float v, int64_t act) {
  switch (act) {
    case kGelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case kRelu: return v > 0.f ? v : 0.f;
    default: return v;
  }
}

void check_decode_inputs(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& idx,
                         const at::Tensor& gate, const at::Tensor& w_in, const c10::optional<at::Tensor>& w_out,
                         int64_t act) {
  TORCH_CHECK(act >= kLinear && act <= kSwiglu, "unknown activation code ", act);
  TORCH_CHECK(x.dim() == 2 && residual.dim() == 2 && x.size(0) == residual.size(0), "x, residual: [N, C]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && residual.scalar_type() == at::kFloat, "x, residual: float32");
  TORCH_CHECK(x.stride(1) == 1 && residual.stride(1) == 1, "x, residual: rows of contiguous values");
  at::assert_no_internal_overlap(residual);  // rows written through raw pointers: no two may share memory
  moegpt::check_disjoint(residual, x, "residual and x");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && idx.scalar_type() == at::kLong, "idx: int64 [N, K]");
  TORCH_CHECK(gate.sizes() == idx.sizes() && gate.scalar_type() == at::kFloat, "gate: float32 [N, K]");
  TORCH_CHECK(w_in.dim() == 3 && w_in.size(1) == x.size(1) && w_in.is_contiguous() &&
              w_in.scalar_type() == at::kFloat, "w_in: contiguous float32 [E, C, Hin]");
  TORCH_CHECK((act == kLinear) == !w_out.has_value(), "w_out is absent exactly for the linear activation");
  const int64_t Hin = w_in.size(2), H = act == kSwiglu ? Hin / 2 : Hin;
  TORCH_CHECK(residual.size(1) == (w_out ? w_out->size(2) : Hin), "residual: [N, C_out]");
  if (w_out)
    TORCH_CHECK(w_out->dim() == 3 && w_out->size(0) == w_in.size(0) && w_out->size(1) == H &&
                w_out->is_contiguous() && w_out->scalar_type() == at::kFloat, "w_out: contiguous float32 [E, H, C]");
}

// The rows, choices and weights of one add_experts_ call, as raw pointers.
struct DecodeCall {
  const float* x;
  int64_t x_stride;
  const int64_t* idx;
  const float* gate;
  const float* w_in;
  const float* w_out;  // nullptr for the linear activation
  int64_t N, K, C, Hin, H, C_out, act;
};

// Share t of T of every chosen expert, added into out (rows of out_stride): with a second product, the hidden
// units [H t/T, H (t+1)/T) (their columns of w_in, both halves for SwiGLU, and their rows of w_out), so the
// shares' sums add up to the whole; for linear, the output columns of that range (disjoint writes).
void add_share(const DecodeCall& c, int64_t t, int64_t T, float* out, int64_t out_stride) {
  const int64_t width = c.w_out ? c.H : c.C_out;
  const int64_t lo = width * t / T, n = width * (t + 1) / T - lo;
  if (n == 0) return;
  std::vector<float> h(c.act == kSwiglu ? 2 * n : n), scaled(std::max(c.C, n));
  for (int64_t r = 0; r < c.N; ++r) {
    const float* x_r = c.x + r * c.x_stride;
    float* y_r = out + r * out_stride;
    for (int64_t j = 0; j < c.K; ++j) {
      const int64_t e = c.idx[r * c.K + j];
      if (e < 0) continue;
      const float g = c.gate[r * c.K + j];
      const float* w_e = c.w_in + e * c.C * c.Hin;
      if (!c.w_out) {  // linear: the expert is its one product
        for (int64_t i = 0; i < c.C; ++i) scaled[i] = g * x_r[i];
        add_rows(y_r + lo, w_e + lo, scaled.data(), c.C, n, c.Hin);
        continue;
      }
      std::fill(h.begin(), h.end(), 0.f);
      add_rows(h.data(), w_e + lo, x_r, c.C, n, c.Hin);
      if (c.act == kSwiglu) add_rows(h.data() + n, w_e + c.H + lo, x_r, c.C, n, c.Hin);
      for (int64_t i = 0; i < n; ++i)
        scaled[i] = g * (c.act == kSwiglu ? h[i] / (1.f + std::exp(-h[i])) * h[n + i] : activate_one(h[i], c.act));
      add_rows(y_r, c.w_out + (e * c.H + lo) * c.C_out, scaled.data(), n, c.C_out, c.C_out);
    }
  }
}

struct ShareTask {
  const DecodeCall* call;
  int64_t share;
  float* out;
  int64_t out_stride;
};

void run_share(void* task) {
  const auto* t = static_cast<const ShareTask*>(task);
  add_share(*t->call, t->share, 2, t->out, t->out_stride);
}

// Split: the helper thread's share sums into a zeroed [N, C_out] buffer, added onto the residual after both
// shares are done (a fixed order: the same bits every time); the caller's share, or a whole unsplit call,
// adds straight onto the residual.
void add_all_shares(const DecodeCall& c, float* residual, int64_t res_stride, bool split) {
  if (!split) {
    add_share(c, 0, 1, residual, res_stride);
    return;
  }
  std::vector<float> partial(c.N * c.C_out, 0.f);
  ShareTask mine{&c, 0, residual, res_stride}, helpers{&c, 1, partial.data(), c.C_out};
  moegpt::run_beside(run_share, &mine, &helpers);
  for (int64_t r = 0; r < c.N; ++r) {
    const float* p = partial.data() + r * c.C_out;
    float* y_r = residual + r * res_stride;
    for (int64_t i = 0; i < c.C_out; ++i) y_r[i] += p[i];
  }
}

at::Tensor add_experts_(at::Tensor residual, const at::Tensor& x, const at::Tensor& idx, const at::Tensor& gate,
                        const at::Tensor& w_in, const c10::optional<at::Tensor>& w_out, int64_t act,
                        bool split) {
  check_decode_inputs(residual, x, idx, gate, w_in, w_out, act);
  const int64_t Hin = w_in.size(2);
  auto idx_c = idx.contiguous();
  auto gate_c = gate.contiguous();
  const DecodeCall call{x.data_ptr<float>(), x.stride(0), idx_c.data_ptr<int64_t>(), gate_c.data_ptr<float>(),
                        w_in.data_ptr<float>(), w_out ? w_out->data_ptr<float>() : nullptr, x.size(0), idx.size(1),
                        x.size(1), Hin, act == kSwiglu ? Hin / 2 : Hin, residual.size(1), act};
  for (int64_t i = 0; i < call.N * call.K; ++i)  // before any write: a refused call leaves the residual as it was
    TORCH_CHECK(call.idx[i] < w_in.size(0), "expert index ", call.idx[i], " out of range for ", w_in.size(0),
                " experts");
  add_all_shares(call, residual.data_ptr<float>(), residual.stride(0), split);
  moegpt::count_write(residual);
  return residual;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moegpt_native, m) {
  m.def("add_experts_(Tensor(a!) residual, Tensor x, Tensor idx, Tensor gate, Tensor w_in, Tensor? w_out, int act, "
        "bool split=False) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(moegpt_native, CPU, m) {
  m.impl("add_experts_", &add_experts_);
}
