// The one-row products of the decode kernels (decode_experts.cpp, decode_matmul.cpp).
#pragma once

#include <cstdint>

namespace moegpt {

// y[0:n] += sum over r < rows of a[r] * m[r * ld : r * ld + n] (a vector-matrix product over n columns of a
// row-major matrix whose rows hold ld values), four rows per pass over y, so that y is read and written a
// quarter as often as the matrix rows are read.
inline void add_rows(float* __restrict__ y, const float* __restrict__ m, const float* a, int64_t rows,
                     int64_t n, int64_t ld) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float a0 = a[r], a1 = a[r + 1], a2 = a[r + 2], a3 = a[r + 3];
    const float *m0 = m + r * ld, *m1 = m0 + ld, *m2 = m1 + ld, *m3 = m2 + ld;
    for (int64_t i = 0; i < n; ++i) y[i] += a0 * m0[i] + a1 * m1[i] + a2 * m2[i] + a3 * m3[i];
  }
  for (; r < rows; ++r) {
    const float ar = a[r];
    const float* mr = m + r * ld;
    for (int64_t i = 0; i < n; ++i) y[i] += ar * mr[i];
  }
}

}  // namespace moegpt
