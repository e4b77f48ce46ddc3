// natgen_emu_abi.h: the plain C interface between an emulated kernel module and the host module.
//
// Every CUDA source is compiled (natgen_emu.h + the source + natgen_emu_module.h) into a small shared
// object with no pybind11 in it; the one pybind11 extension, natgen_emu_host.cpp, is compiled once per
// cache directory, dlopen()s those objects and talks to them only through these structs. Bump
// NATGEN_EMU_ABI_VERSION (and the symbol name) whenever one of them changes.
#pragma once
#ifndef NATGEN_EMU_ABI_H
#define NATGEN_EMU_ABI_H

#include <stddef.h>
#include <stdint.h>

#define NATGEN_EMU_ABI_VERSION 2
#define NATGEN_EMU_MODULE_SYMBOL "natgen_emu_module_v2"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct natgen_emu_param {
    int is_pointer;
    const char* code;  // TypeCode of the value, or of the pointee for pointers
    size_t size, offset;
} natgen_emu_param;

typedef struct natgen_emu_kernel {
    const char* name;
    size_t blob_size;  // bytes of the packed parameter blob
    size_t nparams;
    const natgen_emu_param* params;
} natgen_emu_kernel;

typedef struct natgen_emu_region {  // a tensor span the kernel may touch (guarded copy in checked mode)
    uintptr_t host;
    size_t nbytes;
    const char* label;
} natgen_emu_region;

typedef struct natgen_emu_fixup {  // blob pointer at blob_offset = region data + region_offset
    size_t blob_offset;
    int region;
    size_t region_offset;
} natgen_emu_fixup;

typedef struct natgen_emu_fault {
    int kind;             // natgen_emu::FaultKind; 0 = none
    const char* message;  // owned by the module, valid until its next launch
    unsigned block[3], thread[3];
    int has_thread;
    unsigned other_block[3], other_thread[3];  // the other thread of a race
    int has_other;
} natgen_emu_fault;

enum {
    NATGEN_EMU_LAUNCH_OK = 0,         // ran; `fault` says whether the kernel faulted
    NATGEN_EMU_LAUNCH_ERROR = 1,      // internal error (a C++ exception), message in fault->message
    NATGEN_EMU_LAUNCH_NO_MEMORY = 2,  // std::bad_alloc
};

typedef struct natgen_emu_module {
    int abi_version;  // NATGEN_EMU_ABI_VERSION
    const char* cache_key;
    int sanitized;  // built with the racecheck/initcheck instrumentation (natgen_emu_check.h)
    size_t nkernels;
    const natgen_emu_kernel* kernels;
    size_t (*static_shared_bytes)(void);
    int (*launch)(size_t kernel_index, const unsigned char* blob, size_t blob_size, const unsigned grid[3],
                  const unsigned block[3], size_t shared_mem, int has_seed, uint64_t seed, int checked,
                  double timeout, const natgen_emu_region* regions, size_t nregions, const natgen_emu_fixup* fixups,
                  size_t nfixups, int racecheck, int initcheck, natgen_emu_fault* fault);
} natgen_emu_module;

typedef const natgen_emu_module* (*natgen_emu_module_fn)(void);

#ifdef __cplusplus
}
#endif

#endif  // NATGEN_EMU_ABI_H
