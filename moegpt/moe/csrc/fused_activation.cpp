// The fused activation passes of fused_activation.h, written with ATen's Vectorized<float> (its exp and erf:
// SLEEF's 1-ulp routines, which libtorch_cpu exports), at the width vec_capability.h chose.
#include "vec_capability.h"

#include "fused_activation.h"

#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

float sum_lanes(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

}  // namespace

void swiglu_forward_rows(const float* h, int64_t h_stride, float* a, int64_t R, int64_t H) {
  const Vec one(1.f);
  for (int64_t r = 0; r < R; ++r) {
    const float* gate_half = h + r * h_stride;
    const float* up_half = gate_half + H;
    float* a_r = a + r * H;
    int64_t j = 0;
    for (; j + Vec::size() <= H; j += Vec::size()) {
      const Vec x = Vec::loadu(gate_half + j);
      (x / (one + x.neg().exp()) * Vec::loadu(up_half + j)).store(a_r + j);
    }
    for (; j < H; ++j) a_r[j] = gate_half[j] * sigmoid(gate_half[j]) * up_half[j];
  }
}

// With s = sigmoid(x): silu(x) = x s, silu'(x) = s (1 + x (1 - s)).
void swiglu_backward_rows(const float* grad_a, const float* h, int64_t h_stride, const float* gate, float* a,
                          float* grad_h, float* grad_gate, int64_t R, int64_t H) {
  const Vec one(1.f);
  for (int64_t r = 0; r < R; ++r) {
    const float *x_r = h + r * h_stride, *up_r = x_r + H, *ga_r = grad_a + r * H;
    float *a_r = a + r * H, *gx_r = grad_h + r * 2 * H, *gup_r = gx_r + H;
    const Vec w(gate[r]);
    Vec dot(0.f);
    int64_t j = 0;
    for (; j + Vec::size() <= H; j += Vec::size()) {
      const Vec x = Vec::loadu(x_r + j), up = Vec::loadu(up_r + j), ga = Vec::loadu(ga_r + j);
      const Vec s = one / (one + x.neg().exp());
      const Vec silu = x * s, av = silu * up, gw = ga * w;
      av.store(a_r + j);
      dot = at::vec::fmadd(av, ga, dot);
      (gw * silu).store(gup_r + j);
      (gw * up * s * (one + x * (one - s))).store(gx_r + j);
    }
    float total = sum_lanes(dot);
    for (; j < H; ++j) {
      const float x = x_r[j], s = sigmoid(x), silu = x * s, gw = ga_r[j] * gate[r];
      a_r[j] = silu * up_r[j];
      total += a_r[j] * ga_r[j];
      gup_r[j] = gw * silu;
      gx_r[j] = gw * up_r[j] * s * (1.f + x * (1.f - s));
    }
    grad_gate[r] = total;
  }
}

// gelu'(x) = Phi(x) + x phi(x), Phi the normal CDF 0.5 (1 + erf(x / sqrt 2)), phi its density.
void gelu_backward_rows(const float* grad_a, const float* h, int64_t h_stride, const float* a, int64_t a_stride,
                        const float* gate, float* grad_h, float* grad_gate, int64_t R, int64_t H) {
  const Vec half(0.5f), one(1.f), inv_sqrt2(kInvSqrt2), inv_sqrt_2pi(kInvSqrt2Pi), minus_half(-0.5f);
  for (int64_t r = 0; r < R; ++r) {
    const float *x_r = h + r * h_stride, *a_r = a + r * a_stride, *ga_r = grad_a + r * H;
    float* gx_r = grad_h + r * H;
    const Vec w(gate[r]);
    Vec dot(0.f);
    int64_t j = 0;
    for (; j + Vec::size() <= H; j += Vec::size()) {
      const Vec x = Vec::loadu(x_r + j), ga = Vec::loadu(ga_r + j);
      dot = at::vec::fmadd(Vec::loadu(a_r + j), ga, dot);
      const Vec cdf = half * (one + (x * inv_sqrt2).erf());
      const Vec pdf = (minus_half * x * x).exp() * inv_sqrt_2pi;
      (ga * w * (cdf + x * pdf)).store(gx_r + j);
    }
    float total = sum_lanes(dot);
    for (; j < H; ++j) {
      const float x = x_r[j];
      total += a_r[j] * ga_r[j];
      const float cdf = 0.5f * (1.f + std::erf(x * kInvSqrt2)), pdf = std::exp(-0.5f * x * x) * kInvSqrt2Pi;
      gx_r[j] = ga_r[j] * gate[r] * (cdf + x * pdf);
    }
    grad_gate[r] = total;
  }
}
