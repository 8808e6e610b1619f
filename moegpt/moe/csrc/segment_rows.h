// The row moves of the sorted experts' segments (sorted_experts.cpp): gathering a segment's token rows, and
// adding its output rows back onto their tokens, as plain loops in place of index_select and index_add_ (a
// dispatched op with its own checks per segment, for copies of a few hundred rows). Rows are n contiguous
// floats; the caller checks that every token index is in range.
#pragma once

#include <cstdint>
#include <cstring>

namespace moegpt {

// out[r] = src[tok[r]] for r < rows.
inline void gather_rows(float* __restrict__ out, const float* __restrict__ src, const int64_t* tok, int64_t rows,
                        int64_t n) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * n, src + tok[r] * n, n * sizeof(float));
}

// out[r] = src[tok[r]] and scaled[r] = scale[r] * src[tok[r]] for r < rows, in one pass over the source rows.
inline void gather_rows_scaled(float* __restrict__ out, float* __restrict__ scaled, const float* __restrict__ src,
                               const int64_t* tok, const float* scale, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + tok[r] * n;
    float *o = out + r * n, *w = scaled + r * n;
    const float k = scale[r];
    for (int64_t i = 0; i < n; ++i) {
      o[i] = s[i];
      w[i] = k * s[i];
    }
  }
}

// acc[tok[r]] += scale[r] * rows[r] (scale null: 1) for r < count. Tokens may repeat within the rows: rows are
// added one after another, in order.
inline void scatter_add_rows(float* acc, const float* __restrict__ rows, const int64_t* tok, const float* scale,
                             int64_t count, int64_t n) {
  for (int64_t r = 0; r < count; ++r) {
    float* __restrict__ dst = acc + tok[r] * n;
    const float* src = rows + r * n;
    const float k = scale ? scale[r] : 1.f;
    for (int64_t i = 0; i < n; ++i) dst[i] += k * src[i];
  }
}

}  // namespace moegpt
