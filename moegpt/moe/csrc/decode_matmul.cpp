// Decode: x @ w for the few rows of one generated token, w a large [in, out] matrix (the output head), its
// output columns optionally split with the helper thread (helper_thread.cpp): at one row the product is bound
// by how fast one core streams w, and two cores stream it faster.
//
// Legend: N rows, I in features, O out features.
#include "decode_rows.h"
#include "helper_thread.h"

#include <torch/library.h>
#include <ATen/ATen.h>

namespace {

struct ColumnShare {
  const float* x;
  int64_t x_stride;
  const float* w;
  float* y;
  int64_t N, I, O, lo, width;
};

void run_columns(void* task) {
  const auto* s = static_cast<const ColumnShare*>(task);
  for (int64_t r = 0; r < s->N; ++r)
    moegpt::add_rows(s->y + r * s->O + s->lo, s->w + s->lo, s->x + r * s->x_stride, s->I, s->width, s->O);
}

at::Tensor rows_matmul(const at::Tensor& x, const at::Tensor& w, bool split) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "x: float32 [N, I], rows of contiguous values");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "w: contiguous float32 [I, O]");
  const int64_t N = x.size(0), I = x.size(1), O = w.size(1);
  auto y = at::zeros({N, O}, x.options());
  const int64_t half = split ? O / 2 : O;
  ColumnShare mine{x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(), y.data_ptr<float>(), N, I, O, 0, half};
  if (!split) {
    run_columns(&mine);
    return y;
  }
  ColumnShare helpers = mine;
  helpers.lo = half;
  helpers.width = O - half;
  moegpt::run_beside(run_columns, &mine, &helpers);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moegpt_native, m) {
  m.def("rows_matmul(Tensor x, Tensor w, bool split=False) -> Tensor");
  m.def("halves_on_two_threads() -> bool", &moegpt::halves_run_on_two_threads);  // for a test
}

TORCH_LIBRARY_IMPL(moegpt_native, CPU, m) {
  m.impl("rows_matmul", &rows_matmul);
}
