// natgen_emu_module.h: the C-ABI face of one emulated kernel module (included last by the generated
// wrapper, after natgen_emu.h and the kernel source). The wrapper defines the one exported function:
//
//     extern "C" NATGEN_EMU_MODULE_EXPORT const natgen_emu_module* NATGEN_EMU_MODULE_FUNCTION() {
//         static const natgen_emu_module* module = ::natgen_emu::export_module("<cache key>", {
//             NATGEN_EMU_KERNEL(kernel_a), NATGEN_EMU_KERNEL(kernel_b)});
//         return module;
//     }
//
// and natgen_emu_host.cpp (the pybind11 extension, compiled once) dlopen()s the module and calls it.
// No pybind11 or Python header is seen here, so a kernel module compiles in about a second.
#pragma once
#ifndef NATGEN_EMU_MODULE_H
#define NATGEN_EMU_MODULE_H

#include <new>
#include <stdexcept>

#include "natgen_emu.h"
#include "natgen_emu_abi.h"

#define NATGEN_EMU_MODULE_FUNCTION natgen_emu_module_v2  // == NATGEN_EMU_MODULE_SYMBOL
#define NATGEN_EMU_MODULE_EXPORT __attribute__((visibility("default")))

namespace natgen_emu {

struct ExportedModule {
    std::vector<KernelEntry> entries;
    std::vector<std::vector<natgen_emu_param>> params;  // one array per kernel
    std::vector<natgen_emu_kernel> kernels;
    natgen_emu_module module{};
    std::string message;  // the last launch's fault message (natgen_emu_fault::message points here)
};

inline ExportedModule& exported() {
    static ExportedModule m;
    return m;
}

inline size_t module_static_shared_bytes() { return static_shared_bytes(); }

inline int module_launch(size_t kernel_index, const unsigned char* blob, size_t blob_size, const unsigned grid[3],
                         const unsigned block[3], size_t shared_mem, int has_seed, uint64_t seed, int checked,
                         double timeout, const natgen_emu_region* regions, size_t nregions,
                         const natgen_emu_fixup* fixups, size_t nfixups, int racecheck, int initcheck,
                         natgen_emu_fault* out) {
    ExportedModule& m = exported();
    *out = natgen_emu_fault{};
    try {
        const KernelEntry& entry = m.entries.at(kernel_index);
        std::vector<unsigned char> bytes(blob, blob + blob_size);
        bytes.resize(std::max(bytes.size(), entry.blob_size) + 16);
        std::vector<RegionSpec> specs;
        specs.reserve(nregions);
        for (size_t i = 0; i < nregions; ++i)
            specs.push_back(RegionSpec{regions[i].host, regions[i].nbytes, regions[i].label});
        std::vector<PointerFixup> fix;
        fix.reserve(nfixups);
        for (size_t i = 0; i < nfixups; ++i)
            fix.push_back(PointerFixup{fixups[i].blob_offset, fixups[i].region, fixups[i].region_offset});
        for (const PointerFixup& f : fix)
            if (f.region < 0 || size_t(f.region) >= specs.size() || f.blob_offset + sizeof(void*) > bytes.size())
                throw std::out_of_range("pointer fixup outside the parameter blob or the region list");
        Fault fault = launch(entry.call, bytes, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
                             shared_mem, has_seed != 0, seed, checked != 0, timeout, specs, fix, racecheck,
                             initcheck != 0);
        m.message = fault.message;
        out->kind = fault.kind;
        out->message = m.message.c_str();
        out->block[0] = fault.block.x, out->block[1] = fault.block.y, out->block[2] = fault.block.z;
        out->thread[0] = fault.thread.x, out->thread[1] = fault.thread.y, out->thread[2] = fault.thread.z;
        out->has_thread = fault.has_thread;
        out->other_block[0] = fault.other_block.x, out->other_block[1] = fault.other_block.y;
        out->other_block[2] = fault.other_block.z;
        out->other_thread[0] = fault.other_thread.x, out->other_thread[1] = fault.other_thread.y;
        out->other_thread[2] = fault.other_thread.z;
        out->has_other = fault.has_other;
        return NATGEN_EMU_LAUNCH_OK;
    } catch (const std::bad_alloc&) {
        m.message = "out of memory";
        out->message = m.message.c_str();
        return NATGEN_EMU_LAUNCH_NO_MEMORY;
    } catch (const std::exception& exc) {
        m.message = exc.what();
        out->message = m.message.c_str();
        return NATGEN_EMU_LAUNCH_ERROR;
    }
}

// Builds the module's C tables once (called from the wrapper's exported function).
inline const natgen_emu_module* export_module(const char* cache_key, std::vector<KernelEntry> entries) {
    ExportedModule& m = exported();
    m.entries = std::move(entries);
    m.params.clear();
    for (const KernelEntry& k : m.entries) {
        std::vector<natgen_emu_param> params;
        for (const ParamInfo& p : k.params) params.push_back(natgen_emu_param{p.is_pointer, p.code, p.size, p.offset});
        m.params.push_back(std::move(params));
    }
    m.kernels.clear();
    for (size_t i = 0; i < m.entries.size(); ++i)
        m.kernels.push_back(natgen_emu_kernel{m.entries[i].name, m.entries[i].blob_size, m.params[i].size(),
                                              m.params[i].data()});
    m.module.abi_version = NATGEN_EMU_ABI_VERSION;
    m.module.cache_key = cache_key;
    m.module.sanitized = sanitized_build() ? 1 : 0;
    m.module.nkernels = m.kernels.size();
    m.module.kernels = m.kernels.data();
    m.module.static_shared_bytes = &module_static_shared_bytes;
    m.module.launch = &module_launch;
    return &m.module;
}

}  // namespace natgen_emu

#endif  // NATGEN_EMU_MODULE_H
