// Softmax top-k routing of a layer's tokens with its two router losses, one op each way: the softmax over
// experts, the top-k choices and their gates (renormalised or not), the Switch balance loss and the router
// z-loss. In ATen these are some fifty small ops forward and backward on an [N, E] array, each dispatched (and
// perhaps handed to a second thread) for a few dozen flops per token; here a row is one pass.
//
// Forward, per token n (w_n its weight: 1, or 0 for an ignored token; W = sum_n w_n, D = max(W, 1)):
//   p_n = softmax(l_n), lse_n = logsumexp(l_n), idx_n = the K largest logits (ties: lower expert first),
//   gate_nj = p_n[idx_nj], divided by sum_j gate_nj when renormalised;
//   f_e = #{(n, j): idx_nj = e, weighted by w_n} / max(K W, 1),  P_e = sum_n w_n p_ne / D,
//   balance = E sum_e f_e P_e,  z = sum_n w_n lse_n^2 / D.
// Backward (f is a count, no gradient; the renormalised gates are a softmax over the chosen logits):
//   dp_ne = g_balance E f_e w_n / D (+ g_gate_nj at e = idx_nj when not renormalised),
//   dl_ne = p_ne (dp_ne - <dp_n, p_n>) + g_z 2 lse_n w_n / D p_ne
//           (+ gate_nj (g_gate_nj - <g_gate_n, gate_n>) at e = idx_nj when renormalised).
// The logits, probabilities and logit gradients are stored expert-major (the router computes its logits as
// [E, N] and views them as [N, E]), where the softmax vectorises along the tokens. Rows are independent and
// run in parallel when there are many; the sums over tokens run in token order on one thread, in double, so
// results repeat bit for bit.
//
// Legend: N tokens, E experts, K choices per token.
#include "expert_softmax.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

// Rows per parallel chunk hold at least this many logits: below it one thread does the whole array (waking a
// second one costs more than the work).
constexpr int64_t kGrainLogits = 1 << 15;

// An [N, E] array stored expert-major (element (n, e) at e * N + n): the router's own layout, in which the
// softmax vectorises along the tokens.
struct ExpertMajor {
  float* data;
  int64_t N;
  float& at(int64_t n, int64_t e) const { return data[e * N + n]; }
};

// Whether logit a ranks above logit b: larger, and NaN above every number, as torch.topk ranks them.
inline bool ranks_above(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

// The K highest-ranked logits of row n, highest first, a tie going to the lower expert.
void top_k(const ExpertMajor& l, int64_t n, int64_t E, int64_t K, int64_t* idx, float* val) {
  int64_t held = 0;
  for (int64_t e = 0; e < E; ++e) {
    const float v = l.at(n, e);
    if (held == K && !ranks_above(v, val[K - 1])) continue;
    int64_t pos = held < K ? held++ : K - 1;
    for (; pos > 0 && ranks_above(v, val[pos - 1]); --pos) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
    }
    val[pos] = v;
    idx[pos] = e;
  }
}

// Choices and gates of row n (its softmax p already computed).
void choose_row(const ExpertMajor& l, const ExpertMajor& p, int64_t n, int64_t E, int64_t K, bool normalize,
                int64_t* idx, float* gate) {
  top_k(l, n, E, K, idx, gate);  // gate holds the chosen logits until overwritten below
  float kept = 0.f;
  for (int64_t j = 0; j < K; ++j) kept += (gate[j] = p.at(n, idx[j]));
  if (normalize)
    for (int64_t j = 0; j < K; ++j) gate[j] /= kept;
}

const float* token_weights(const c10::optional<at::Tensor>& w, int64_t N) {
  if (!w) return nullptr;
  TORCH_CHECK(w->dim() == 1 && w->size(0) == N && w->is_contiguous() && w->scalar_type() == at::kFloat,
              "token_weights: contiguous float32 [N]");
  return w->data_ptr<float>();
}

double weight_total(const float* w, int64_t N) {
  if (!w) return static_cast<double>(N);
  double total = 0;
  for (int64_t n = 0; n < N; ++n) total += w[n];
  return total;
}

// An [N, E] view of a tensor stored expert-major, refused otherwise.
ExpertMajor expert_major(const at::Tensor& t, int64_t N, int64_t E, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == E && t.scalar_type() == at::kFloat &&
              (N <= 1 || t.stride(0) == 1) && (E <= 1 || N == 0 || t.stride(1) == N), what,
              ": float32 [N, E] stored expert-major (the transpose of a contiguous [E, N])");
  return {t.data_ptr<float>(), N};
}

// The sums over tokens (in token order, in double) behind the two losses: (balance, z, fraction_E).
std::tuple<double, double, at::Tensor> losses(const ExpertMajor& p, const float* lse, const int64_t* idx,
                                              const float* w, int64_t N, int64_t E, int64_t K,
                                              const at::TensorOptions& opts) {
  std::vector<double> count(E, 0.0), mass(E, 0.0);
  double z = 0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n) mass[e] += (w ? w[n] : 1.0) * p.at(n, e);
  for (int64_t n = 0; n < N; ++n) {
    const double wn = w ? w[n] : 1.0;
    for (int64_t j = 0; j < K; ++j) count[idx[n * K + j]] += wn;
    z += wn * static_cast<double>(lse[n]) * lse[n];
  }
  const double W = weight_total(w, N), D = std::max(W, 1.0), assigned = std::max(K * W, 1.0);
  auto fraction = at::empty({E}, opts);
  float* f = fraction.data_ptr<float>();
  double balance = 0;
  for (int64_t e = 0; e < E; ++e) {
    f[e] = static_cast<float>(count[e] / assigned);
    balance += count[e] / assigned * (mass[e] / D);
  }
  return {E * balance, z / D, fraction};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& logits, int64_t K, bool normalize, const c10::optional<at::Tensor>& weights) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "logits: float32 [N, E]");
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1 && K >= 1 && K <= E, "need 1 <= k <= E experts (k=", K, ", E=", E, ")");
  const float* w = token_weights(weights, N);
  const auto logits_EN = logits.t().contiguous();  // no copy in the router's layout
  const ExpertMajor l{logits_EN.data_ptr<float>(), N};
  auto opts = logits.options();
  auto idx = at::empty({N, K}, opts.dtype(at::kLong));
  auto gate = at::empty({N, K}, opts);
  auto probs_EN = at::empty({E, N}, opts);
  auto lse = at::empty({N}, opts);
  const ExpertMajor p{probs_EN.data_ptr<float>(), N};
  float *g = gate.data_ptr<float>(), *s = lse.data_ptr<float>();
  int64_t* i = idx.data_ptr<int64_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainLogits / E), [&](int64_t begin, int64_t end) {
    softmax_over_experts(l.data, p.data, s, N, E, begin, end);
    for (int64_t n = begin; n < end; ++n) choose_row(l, p, n, E, K, normalize, i + n * K, g + n * K);
  });
  auto [balance, z, fraction] = losses(p, s, i, w, N, E, K, opts);
  return {idx, gate, probs_EN.t(), lse, fraction, at::scalar_tensor(balance, opts), at::scalar_tensor(z, opts)};
}

// dL/dl of row n into grad (see the top of the file); dp is scratch of E floats.
void backward_row(const ExpertMajor& p, const ExpertMajor& grad, int64_t n, int64_t E, int64_t K, bool normalize,
                  const int64_t* idx, const float* gate, const float* grad_gate, const float* f, float balance_scale,
                  float z_scale, float* dp) {
  for (int64_t e = 0; e < E; ++e) dp[e] = balance_scale * f[e];
  if (!normalize)
    for (int64_t j = 0; j < K; ++j) dp[idx[j]] += grad_gate[j];
  float dot = 0.f;
  for (int64_t e = 0; e < E; ++e) dot += dp[e] * p.at(n, e);
  for (int64_t e = 0; e < E; ++e) grad.at(n, e) = p.at(n, e) * (dp[e] - dot + z_scale);
  if (!normalize) return;
  float c = 0.f;
  for (int64_t j = 0; j < K; ++j) c += grad_gate[j] * gate[j];
  for (int64_t j = 0; j < K; ++j) grad.at(n, idx[j]) += gate[j] * (grad_gate[j] - c);
}

at::Tensor backward(const at::Tensor& grad_gate, const at::Tensor& grad_balance, const at::Tensor& grad_z,
                    const at::Tensor& probs, const at::Tensor& lse, const at::Tensor& idx, const at::Tensor& gate,
                    const at::Tensor& fraction, const c10::optional<at::Tensor>& weights, bool normalize) {
  TORCH_CHECK(idx.dim() == 2 && idx.is_contiguous() && idx.scalar_type() == at::kLong, "idx: contiguous int64 [N, K]");
  const int64_t N = idx.size(0), K = idx.size(1), E = probs.dim() == 2 ? probs.size(1) : 0;
  const ExpertMajor p = expert_major(probs, N, E, "probs");
  for (const auto* t : {&grad_gate, &gate})
    TORCH_CHECK(t->sizes() == idx.sizes() && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "grad_gate, gate: contiguous float32 [N, K]");
  TORCH_CHECK(lse.numel() == N && lse.is_contiguous() && lse.scalar_type() == at::kFloat, "lse: float32 [N]");
  TORCH_CHECK(fraction.numel() == E && fraction.is_contiguous() && fraction.scalar_type() == at::kFloat,
              "fraction: float32 [E]");
  TORCH_CHECK(grad_balance.numel() == 1 && grad_z.numel() == 1, "grad_balance, grad_z: one value each");
  const int64_t* i = idx.data_ptr<int64_t>();
  for (int64_t m = 0; m < N * K; ++m) TORCH_CHECK(i[m] >= 0 && i[m] < E, "idx: expert index out of range");
  const float* w = token_weights(weights, N);
  const float D = static_cast<float>(std::max(weight_total(w, N), 1.0));
  const float gb = grad_balance.to(at::kFloat).item<float>() * E / D;
  const float gz = grad_z.to(at::kFloat).item<float>() * 2 / D;
  auto grad_EN = at::empty({E, N}, probs.options());
  const ExpertMajor grad{grad_EN.data_ptr<float>(), N};
  const float *s = lse.data_ptr<float>(), *f = fraction.data_ptr<float>();
  const float *gg = grad_gate.data_ptr<float>(), *g = gate.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainLogits / E), [&](int64_t begin, int64_t end) {
    std::vector<float> dp(E);
    for (int64_t n = begin; n < end; ++n) {
      const float wn = w ? w[n] : 1.f;
      backward_row(p, grad, n, E, K, normalize, i + n * K, g + n * K, gg + n * K, f, gb * wn, gz * s[n] * wn,
                   dp.data());
    }
  });
  return grad_EN.t();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moegpt_native, m) {
  m.def("softmax_topk_routing(Tensor logits, int k, bool normalize, Tensor? token_weights) -> "
        "(Tensor idx, Tensor gate, Tensor probs, Tensor lse, Tensor fraction, Tensor balance, Tensor z)");
  m.def("softmax_topk_routing_backward(Tensor grad_gate, Tensor grad_balance, Tensor grad_z, Tensor probs, "
        "Tensor lse, Tensor idx, Tensor gate, Tensor fraction, Tensor? token_weights, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(moegpt_native, CPU, m) {
  m.impl("softmax_topk_routing", &forward);
  m.impl("softmax_topk_routing_backward", &backward);
}
