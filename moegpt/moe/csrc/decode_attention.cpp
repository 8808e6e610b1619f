// Decode: one generated token per sequence through multi-head causal self-attention over the KV cache, in
// one call on the calling thread: x += proj(attention(q, keys, values)), with q and the token's key and value
// projected from h (the normed x) and the key and value written into the cache's row `pos` first. At one token
// the Python path's projections, attention and output product cost more to dispatch than to compute.
//
// The cache holds one row per token, [keys of every head, values of every head] (moegpt/kv_cache.py); the
// weights come as [in, out] matrices, as the model's decode step multiplies them (model.Linear).
// Legend: B rows (sequences), C width, S cache capacity (tokens), P = pos + 1 tokens attended, D head width.
#include "decode_rows.h"
#include "inplace.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_attention_inputs(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_qkv,
                            const c10::optional<at::Tensor>& b_qkv, const at::Tensor& w_proj,
                            const c10::optional<at::Tensor>& b_proj, const at::Tensor& kv, int64_t pos,
                            int64_t n_head) {
  const auto f32 = at::kFloat;
  TORCH_CHECK(x.dim() == 2 && h.sizes() == x.sizes() && x.scalar_type() == f32 && h.scalar_type() == f32 &&
              x.stride(1) == 1 && h.stride(1) == 1, "x, h: float32 [B, C], rows of contiguous values");
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(n_head >= 1 && C % n_head == 0, "n_head must divide the width");
  TORCH_CHECK(w_qkv.sizes() == at::IntArrayRef({C, 3 * C}) && w_qkv.is_contiguous() && w_qkv.scalar_type() == f32,
              "w_qkv: contiguous float32 [C, 3C]");
  TORCH_CHECK(w_proj.sizes() == at::IntArrayRef({C, C}) && w_proj.is_contiguous() && w_proj.scalar_type() == f32,
              "w_proj: contiguous float32 [C, C]");
  TORCH_CHECK(!b_qkv || (b_qkv->sizes() == at::IntArrayRef({3 * C}) && b_qkv->is_contiguous() &&
                         b_qkv->scalar_type() == f32), "b_qkv: contiguous float32 [3C]");
  TORCH_CHECK(!b_proj || (b_proj->sizes() == at::IntArrayRef({C}) && b_proj->is_contiguous() &&
                          b_proj->scalar_type() == f32), "b_proj: contiguous float32 [C]");
  TORCH_CHECK(kv.dim() == 3 && kv.size(0) == B && kv.size(2) == 2 * C && kv.is_contiguous() &&
              kv.scalar_type() == f32, "kv: contiguous float32 [B, S, 2C]");
  TORCH_CHECK(pos >= 0 && pos < kv.size(1), "pos ", pos, " outside the cache's ", kv.size(1), " rows");
  // written through raw pointers: no two rows of x may share memory, nor x and the cache; x may be h itself
  // (a row of h is read whole before its row of x is written), but not a shifted view of it
  at::assert_no_internal_overlap(x);
  moegpt::check_disjoint(kv, x, "the cache and x");
  moegpt::check_disjoint(kv, h, "the cache and h");
  if (!x.is_same(h)) moegpt::check_disjoint(x, h, "x and h (unless the same tensor)");
}

// out[0:D] = softmax over t < P of (q . keys_t) * scale, applied to values_t: one head of one row.
void attend(const float* q, int64_t row_width, const float* keys, const float* values,
            int64_t P, int64_t D, float scale, float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t t = 0; t < P; ++t) {
    const float* k = keys + t * row_width;
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
    scores[t] = dot * scale;
    top = std::max(top, scores[t]);
  }
  float total = 0.f;
  for (int64_t t = 0; t < P; ++t) total += (scores[t] = std::exp(scores[t] - top));
  std::fill(out, out + D, 0.f);
  for (int64_t t = 0; t < P; ++t) {
    const float p = scores[t] / total;
    const float* v = values + t * row_width;
    for (int64_t d = 0; d < D; ++d) out[d] += p * v[d];
  }
}

at::Tensor decode_attention_(at::Tensor x, const at::Tensor& h, const at::Tensor& w_qkv,
                             const c10::optional<at::Tensor>& b_qkv, const at::Tensor& w_proj,
                             const c10::optional<at::Tensor>& b_proj, at::Tensor kv, int64_t pos, int64_t n_head) {
  check_attention_inputs(x, h, w_qkv, b_qkv, w_proj, b_proj, kv, pos, n_head);
  const int64_t B = x.size(0), C = x.size(1), S = kv.size(1), D = C / n_head, P = pos + 1;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::vector<float> qkv(3 * C), heads(C), scores(P);
  for (int64_t b = 0; b < B; ++b) {
    const float* h_b = h.data_ptr<float>() + b * h.stride(0);
    float* rows = kv.data_ptr<float>() + b * S * 2 * C;
    if (b_qkv) std::copy_n(b_qkv->data_ptr<float>(), 3 * C, qkv.begin());
    else std::fill(qkv.begin(), qkv.end(), 0.f);
    moegpt::add_rows(qkv.data(), w_qkv.data_ptr<float>(), h_b, C, 3 * C, 3 * C);
    std::copy_n(qkv.data() + C, 2 * C, rows + pos * 2 * C);  // the token's keys and values, then attend
    for (int64_t hd = 0; hd < n_head; ++hd)
      attend(qkv.data() + hd * D, 2 * C, rows + hd * D, rows + C + hd * D, P, D, scale, scores.data(),
             heads.data() + hd * D);
    float* x_b = x.data_ptr<float>() + b * x.stride(0);
    moegpt::add_rows(x_b, w_proj.data_ptr<float>(), heads.data(), C, C, C);
    if (b_proj)
      for (int64_t c = 0; c < C; ++c) x_b[c] += b_proj->data_ptr<float>()[c];
  }
  moegpt::count_write(x);
  moegpt::count_write(kv);
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moegpt_native, m) {
  m.def("decode_attention_(Tensor(a!) x, Tensor h, Tensor w_qkv, Tensor? b_qkv, Tensor w_proj, Tensor? b_proj, "
        "Tensor(b!) kv, int pos, int n_head) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(moegpt_native, CPU, m) {
  m.impl("decode_attention_", &decode_attention_);
}
