// Included first by the files written with ATen's Vectorized<float> (fused_activation.cpp,
// expert_softmax.cpp): ATen picks the vector width from CPU_CAPABILITY_* macros its own build defines per
// kernel file; an extension has to define them itself, from what -march=native enabled. Those files include
// nothing else of ATen, so the macros reach no other code.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT  // Vectorized<float> of plain scalar loops: the same results, slower
#endif
