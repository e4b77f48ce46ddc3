// bfloat16 as torch stores it, for every CPU kernel (fused and unfused): the high 16 bits of a float.
// Widening is exact; narrowing rounds to nearest even, as torch's float -> bfloat16 conversion does, so a kernel
// writing bf16 itself has the bits of converting afterwards. Every NaN is written as the quiet NaN 0x7FC0
// (torch's scalar conversion does the same; its vectorized one writes 0xFFFF: NaN bits are not a contract).
#pragma once

#include <cstdint>
#include <cstring>

namespace natgen {

struct bf16 {
    uint16_t bits;
};

inline __attribute__((always_inline)) float bf16_to_float(bf16 x) {
    const uint32_t b = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &b, sizeof(f));
    return f;
}

inline __attribute__((always_inline)) bf16 float_to_bf16(float x) {
    uint32_t b;
    std::memcpy(&b, &x, sizeof(b));
    return bf16{x != x ? uint16_t(0x7FC0) : uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16)};
}

}  // namespace natgen
