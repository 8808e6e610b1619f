// Decode: residual[n] += sum over choices j (idx[n, j] >= 0) of gate[n, j] * expert_{idx[n, j]}(x[n]), for the
// few rows of one generated token, in plain loops on the calling thread: per chosen expert the ops (two
// products, activation, gated add) cost more to dispatch than to compute at one row.
//
// Legend: N rows (sequences), K choices per row, C width, E experts, H expert hidden width, Hin the first
// projection's width (2H for SwiGLU, H otherwise, C for linear).
#include "activation.h"

#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// y[0:n] += sum over r < rows of a[r] * m[r * n : (r + 1) * n] (a vector-matrix product, row-major m), four
// rows per pass over y, so that y is read and written a quarter as often as the matrix rows are read.
void add_rows(float* __restrict__ y, const float* __restrict__ m, const float* a, int64_t rows, int64_t n) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float a0 = a[r], a1 = a[r + 1], a2 = a[r + 2], a3 = a[r + 3];
    const float *m0 = m + r * n, *m1 = m0 + n, *m2 = m1 + n, *m3 = m2 + n;
    for (int64_t i = 0; i < n; ++i) y[i] += a0 * m0[i] + a1 * m1[i] + a2 * m2[i] + a3 * m3[i];
  }
  for (; r < rows; ++r) {
    const float ar = a[r];
    const float* mr = m + r * n;
    for (int64_t i = 0; i < n; ++i) y[i] += ar * mr[i];
  }
}

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

at::Tensor add_experts_(at::Tensor residual, const at::Tensor& x, const at::Tensor& idx, const at::Tensor& gate,
                        const at::Tensor& w_in, const c10::optional<at::Tensor>& w_out, int64_t act) {
  check_decode_inputs(residual, x, idx, gate, w_in, w_out, act);
  const int64_t N = x.size(0), K = idx.size(1), C = x.size(1), E = w_in.size(0), Hin = w_in.size(2);
  const int64_t H = act == kSwiglu ? Hin / 2 : Hin;
  const int64_t C_out = residual.size(1);
  auto idx_c = idx.contiguous();
  auto gate_c = gate.contiguous();
  const int64_t* idx_p = idx_c.data_ptr<int64_t>();
  const float* gate_p = gate_c.data_ptr<float>();
  const float* w_in_p = w_in.data_ptr<float>();
  const float* w_out_p = w_out ? w_out->data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < N * K; ++i)  // before any write: a refused call leaves the residual as it was
    TORCH_CHECK(idx_p[i] < E, "expert index ", idx_p[i], " out of range for ", E, " experts");
  std::vector<float> h(Hin), scaled(std::max(C, H));
  for (int64_t n = 0; n < N; ++n) {
    const float* x_n = x.data_ptr<float>() + n * x.stride(0);
    float* y_n = residual.data_ptr<float>() + n * residual.stride(0);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = idx_p[n * K + j];
      if (e < 0) continue;
      const float g = gate_p[n * K + j];
      const float* w_e = w_in_p + e * C * Hin;
      if (!w_out_p) {  // linear: the expert is its one product
        for (int64_t c = 0; c < C; ++c) scaled[c] = g * x_n[c];
        add_rows(y_n, w_e, scaled.data(), C, Hin);
        continue;
      }
      std::fill(h.begin(), h.end(), 0.f);
      add_rows(h.data(), w_e, x_n, C, Hin);
      for (int64_t i = 0; i < H; ++i)
        scaled[i] = g * (act == kSwiglu ? h[i] / (1.f + std::exp(-h[i])) * h[H + i] : activate_one(h[i], act));
      add_rows(y_n, w_out_p + e * H * C_out, scaled.data(), H, C_out);
    }
  }
  return residual;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moegpt_native, m) {
  m.def("add_experts_(Tensor(a!) residual, Tensor x, Tensor idx, Tensor gate, Tensor w_in, Tensor? w_out, int act) "
        "-> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(moegpt_native, CPU, m) {
  m.impl("add_experts_", &add_experts_);
}
