// The sorted dispatch's first step in one op: a layer's choices sorted by expert with a counting sort (stable:
// within an expert, in flat (token, choice) order), their tokens, and each expert's count. In ATen this is a
// stable argsort of N*K keys, a bincount, a slice and an integer division, where two passes over the keys
// suffice (the keys are small integers).
//
// Legend: N tokens, K choices per token, E experts, M kept choices (those not -1).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

namespace {

// (order_M: flat indices n * K + j of the kept choices sorted by expert, tok_M = order_M / K, counts_E).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_assignments(const at::Tensor& idx, int64_t E) {
  TORCH_CHECK(idx.dim() == 2 && idx.is_contiguous() && idx.scalar_type() == at::kLong,
              "idx: contiguous int64 [N, K]");
  TORCH_CHECK(E >= 1, "need at least one expert");
  const int64_t K = idx.size(1), total = idx.numel();
  const int64_t* e_of = idx.data_ptr<int64_t>();
  auto counts = at::zeros({E}, idx.options());
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t m = 0; m < total; ++m) {
    const int64_t e = e_of[m];
    TORCH_CHECK(e >= -1 && e < E, "idx: expert index ", e, " out of range for ", E, " experts");
    if (e >= 0) ++count[e];
  }
  std::vector<int64_t> next(E);
  int64_t kept = 0;
  for (int64_t e = 0; e < E; ++e) {
    next[e] = kept;
    kept += count[e];
  }
  auto order = at::empty({kept}, idx.options());
  auto tok = at::empty({kept}, idx.options());
  int64_t *o = order.data_ptr<int64_t>(), *t = tok.data_ptr<int64_t>();
  for (int64_t m = 0; m < total; ++m) {
    const int64_t e = e_of[m];
    if (e < 0) continue;
    const int64_t slot = next[e]++;
    o[slot] = m;
    t[slot] = m / K;
  }
  return {order, tok, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moegpt_native, m) {
  m.def("sort_assignments(Tensor idx, int n_expert) -> (Tensor order, Tensor tok, Tensor counts)");
}

TORCH_LIBRARY_IMPL(moegpt_native, CPU, m) {
  m.impl("sort_assignments", &sort_assignments);
}
