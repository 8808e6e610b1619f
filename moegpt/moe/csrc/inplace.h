// What the decode kernels' in-place writes, made through raw pointers, owe ATen: outputs that share no memory
// with their inputs, and a version bump.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace moegpt {

// The bytes from a tensor's first element to one past its last (a view's whole span, holes included).
inline std::pair<const char*, const char*> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const char* begin = static_cast<const char*>(t.data_ptr());
  return {begin, begin + (last + 1) * t.element_size()};
}

// Refuses a and b whose spans intersect: conservative (two interleaved views that share no element are
// refused too), which is safe, and ATen's own check gives up on non-contiguous views such as a cache's rows.
inline void check_disjoint(const at::Tensor& a, const at::Tensor& b, const char* what) {
  if (a.numel() == 0 || b.numel() == 0) return;
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  TORCH_CHECK(a1 <= b0 || b1 <= a0, what, " must not overlap in memory");
}

// A custom op's in-place write does not count itself: autograd must see it (inference tensors have no version).
inline void count_write(at::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace moegpt
