// natgen CPU kernels: the argument block (natgen::Args). Every tensor and size a kernel reads arrives in it:
// 8-byte fields that runtime/cpu.py packs, in the same order, into an int64 tensor.
#pragma once

#include <cstdint>

namespace natgen {

// Field order is a contract with runtime/cpu.py (ARG_FIELDS); tests/test_cpu_codegen.py checks it.
struct Args {
    int64_t q, k, v, out, lse, extra_k, extra_v;
    int64_t grad_out, grad_lse, grad_q, grad_k, grad_v, grad_extra_k, grad_extra_v;
    int64_t batch, heads, head_dim, head_dim_v, n_extra, threads;
    int64_t length[3], kernel[3], stride[3], dilation[3], causal[3];
    double scale;
};

}  // namespace natgen
