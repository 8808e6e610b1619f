// The softmax over experts of a range of tokens whose logits are stored expert-major (the router's layout:
// l[e * ld + n]), vectorised along the tokens (csrc/expert_softmax.cpp): with a few experts a token's row is
// too short to vectorise, and scalar exp costs more than everything else routing does.
//
// Legend: E experts, n tokens [n0, n1); ld the distance between two experts' rows.
#pragma once

#include <cstdint>

// p[e * ld + n] = softmax over e of l[e * ld + n]; lse[n] = logsumexp over e.
void softmax_over_experts(const float* l, float* p, float* lse, int64_t ld, int64_t E, int64_t n0, int64_t n1);
