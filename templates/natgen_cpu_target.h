// natgen CPU kernels: compile targets and attributes. The kernel body is built once per ISA variant
// (natgen_cpu.h): AVX-512 (F/BW/VL/DQ + FMA, 64-byte vectors), AVX2+FMA (32-byte vectors) and portable
// (baseline x86-64, or any other architecture; 32-byte GCC vectors, lowered to what the target has). Each
// x86 variant is compiled under `#pragma GCC target`, so one module holds all three and the runtime picks
// one per call (runtime/cpu_isa.py) from the CPU's features.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NATGEN_PORTABLE_ONLY)
#define NATGEN_X86_VARIANTS 1
#else
#define NATGEN_X86_VARIANTS 0
#endif
// NATGEN_PIN(v) keeps a vector in a register: without it GCC folds one load into every FMA that reads it
// (a value row used by two queries was loaded twice, and the loads, not the FMAs, set the pace).
#if defined(__x86_64__) && defined(__GNUC__)
#define NATGEN_PIN(v) asm("" : "+x"(v))
#else
#define NATGEN_PIN(v) ((void)0)
#endif
// The fixed-shape kernels stay out of line (one copy each, however many call sites).
#define NATGEN_FIXED_TARGET __attribute__((noinline))
#define NATGEN_INLINE inline __attribute__((always_inline))
#define NATGEN_EXPORT __attribute__((visibility("default")))
