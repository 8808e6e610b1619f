// The activation codes the kernels take (moegpt/moe/native.py, ACTIVATION_CODES).
#pragma once

#include <cstdint>

enum Activation : int64_t { kLinear = 0, kGelu = 1, kRelu = 2, kSwiglu = 3 };
