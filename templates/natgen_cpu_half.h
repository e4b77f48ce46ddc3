// The 16-bit input types of the CPU kernels (fused and unfused), as torch stores them, and their conversions
// to and from float. Widening is exact; narrowing rounds to nearest even, as torch's float -> bfloat16 / half
// conversions do, so a kernel reading or writing them itself has the bits of converting first / afterwards.
//   bf16: the high 16 bits of a float. Every NaN is written as the quiet NaN 0x7FC0 (torch's scalar
//         conversion does the same; its vectorized one writes 0xFFFF: NaN bits are not a contract).
//   f16:  IEEE binary16, converted through the compiler's _Float16 (F16C instructions in the x86 variants,
//         which enable them; exact subnormals either way: nothing here sets flush-to-zero).
#pragma once

#include <cstdint>
#include <cstring>

namespace natgen {

struct bf16 {
    uint16_t bits;
};

struct f16 {
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

inline __attribute__((always_inline)) float f16_to_float(f16 x) {
    _Float16 h;
    std::memcpy(&h, &x.bits, sizeof(h));
    return static_cast<float>(h);
}

inline __attribute__((always_inline)) f16 float_to_f16(float x) {
    const _Float16 h = static_cast<_Float16>(x);  // to nearest even
    f16 out;
    std::memcpy(&out.bits, &h, sizeof(h));
    return out;
}

}  // namespace natgen
