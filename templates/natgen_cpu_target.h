// natgen CPU kernels: compile targets and attributes. NATGEN_CLONES builds a generated instance's unit
// function for AVX-512, AVX2+FMA and baseline x86-64, one chosen at load time from the CPU's features;
// NATGEN_INLINE and NATGEN_EXPORT are the attributes the kernels and the extern "C" entry points use.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NATGEN_NO_CLONES)
#define NATGEN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NATGEN_CLONES
#endif
// The fixed-shape kernels (constant K and head_dim) are built once, for AVX2+FMA, not per clone of the unit
// function (three clones of them took 6 s of compile time), and called where the CPU has AVX2 and FMA.
// NATGEN_PIN(v) keeps a vector in a register: without it GCC folds one load into every FMA that reads it
// (a value row used by two queries was loaded twice, and the loads, not the FMAs, set the pace).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NATGEN_NO_CLONES)
#define NATGEN_FIXED_TARGET __attribute__((noinline, target("arch=x86-64-v3")))
#define NATGEN_FIXED_ISA() (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
#define NATGEN_PIN(v) asm("" : "+x"(v))
#else
#define NATGEN_FIXED_TARGET __attribute__((noinline))
#define NATGEN_FIXED_ISA() true
#define NATGEN_PIN(v) ((void)0)
#endif
#define NATGEN_INLINE inline __attribute__((always_inline))
#define NATGEN_EXPORT __attribute__((visibility("default")))
