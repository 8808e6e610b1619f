// softmax_over_experts (expert_softmax.h), written with ATen's Vectorized<float> (its exp and log: SLEEF's
// 1-ulp routines) at the width vec_capability.h chose.
#include "vec_capability.h"

#include "expert_softmax.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

namespace {

using Vec = at::vec::Vectorized<float>;

// Three passes over the experts' rows for tokens [n, n + width): max, exp and sum, scale; `width` is one
// vector or (the tail) fewer.
void softmax_block(const float* l, float* p, float* lse, int64_t ld, int64_t E, int64_t n, int64_t width) {
  Vec top = Vec::loadu(l + n, width);
  for (int64_t e = 1; e < E; ++e) top = at::vec::maximum(top, Vec::loadu(l + e * ld + n, width));
  Vec sum(0.f);
  for (int64_t e = 0; e < E; ++e) {
    const Vec x = (Vec::loadu(l + e * ld + n, width) - top).exp();
    x.store(p + e * ld + n, width);
    sum = sum + x;
  }
  const Vec inv = Vec(1.f) / sum;
  for (int64_t e = 0; e < E; ++e) (Vec::loadu(p + e * ld + n, width) * inv).store(p + e * ld + n, width);
  (top + sum.log()).store(lse + n, width);
}

}  // namespace

void softmax_over_experts(const float* l, float* p, float* lse, int64_t ld, int64_t E, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += Vec::size())
    softmax_block(l, p, lse, ld, E, n, std::min<int64_t>(Vec::size(), n1 - n));
}
