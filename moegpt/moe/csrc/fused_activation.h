// One pass over an expert block's hidden rows for its activation, forward and backward, with the gate's
// scaling and gradient folded in (csrc/fused_activation.cpp). ATen runs each of these as four to eight
// separate elementwise passes (and SwiGLU's halves are strided views, slower still).
//
// Legend: R rows of one expert block, H hidden width; h the first projection's output [R, Hin] (Hin = 2H for
// SwiGLU: gate half then up half), a the activation [R, H], grad_a = dL/da before the gate [R, H], gate [R].
// Every matrix is row-major with rows `stride` floats apart (a row of a wider buffer); gate, grad_gate and
// the outputs' rows are contiguous.
#pragma once

#include <cstdint>

// a = silu(h_gate) * h_up.
void swiglu_forward_rows(const float* h, int64_t h_stride, float* a, int64_t R, int64_t H);

// a as forward; grad_gate[r] = sum_j a * grad_a; grad_h = gate[r] * da/dh * grad_a ([R, 2H], contiguous).
void swiglu_backward_rows(const float* grad_a, const float* h, int64_t h_stride, const float* gate, float* a,
                          float* grad_h, float* grad_gate, int64_t R, int64_t H);

// grad_gate[r] = sum_j a * grad_a (a = gelu(h), kept by forward); grad_h = gate[r] * gelu'(h) * grad_a
// ([R, H], contiguous), with exact (erf) GELU.
void gelu_backward_rows(const float* grad_a, const float* h, int64_t h_stride, const float* a, int64_t a_stride,
                        const float* gate, float* grad_h, float* grad_gate, int64_t R, int64_t H);
