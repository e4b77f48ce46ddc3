// natgen_emu_binding.h: the pybind11 face of one emulated module (included last by the generated
// wrapper, after the kernel source and its kernel table).
#pragma once
#include <pybind11/pybind11.h>

#include "natgen_emu.h"

namespace natgen_emu {
namespace py = pybind11;

inline py::tuple dim3_tuple(uint3 v) { return py::make_tuple(v.x, v.y, v.z); }
inline dim3 tuple_dim3(const py::tuple& t) {
    return dim3(t[0].cast<unsigned>(), t[1].cast<unsigned>(), t[2].cast<unsigned>());
}

// kernels(): [(name, blob_size, [(is_pointer, type_code, size, offset), ...]), ...]
// launch(name, grid, block, shared_mem, seed|None, checked, timeout, blob, regions, fixups)
//   regions: [(host_address, nbytes, label)], fixups: [(blob_offset, region_index, offset_in_region)]
//   returns None, or (fault_kind, message, block, thread|None)
inline void bind_module(py::module_& m, const std::vector<KernelEntry>& table, const char* cache_key) {
    static const std::vector<KernelEntry> kernels = table;
    m.attr("cache_key") = cache_key;
    m.def("kernels", []() {
        py::list out;
        for (const KernelEntry& k : kernels) {
            py::list params;
            for (const ParamInfo& p : k.params) params.append(py::make_tuple(p.is_pointer, p.code, p.size, p.offset));
            out.append(py::make_tuple(k.name, k.blob_size, params));
        }
        return out;
    });
    m.def("launch", [](const std::string& name, py::tuple grid, py::tuple block, size_t shared_mem, py::object seed,
                       bool checked, double timeout, py::bytes blob, py::list regions, py::list fixups) -> py::object {
        const KernelEntry* entry = nullptr;
        for (const KernelEntry& k : kernels)
            if (name == k.name) entry = &k;
        if (!entry) throw py::key_error(name);
        std::string blob_str = blob;
        std::vector<unsigned char> bytes(blob_str.begin(), blob_str.end());
        bytes.resize(std::max(bytes.size(), entry->blob_size) + 16);
        std::vector<RegionSpec> specs;
        for (py::handle r : regions) {
            py::tuple t = py::reinterpret_borrow<py::tuple>(r);
            specs.push_back(RegionSpec{t[0].cast<uintptr_t>(), t[1].cast<size_t>(), t[2].cast<std::string>()});
        }
        std::vector<PointerFixup> fix;
        for (py::handle f : fixups) {
            py::tuple t = py::reinterpret_borrow<py::tuple>(f);
            fix.push_back(PointerFixup{t[0].cast<size_t>(), t[1].cast<int>(), t[2].cast<size_t>()});
        }
        const bool has_seed = !seed.is_none();
        const uint64_t seed_value = has_seed ? seed.cast<uint64_t>() : 0;
        Fault fault = launch(entry->call, bytes, tuple_dim3(grid), tuple_dim3(block), shared_mem, has_seed, seed_value,
                             checked, timeout, specs, fix);
        if (fault.kind == FAULT_NONE) return py::none();
        py::object thread = fault.has_thread ? py::object(dim3_tuple(fault.thread)) : py::object(py::none());
        return py::make_tuple(fault.kind, fault.message, dim3_tuple(fault.block), thread);
    });
    m.def("static_shared_bytes", []() { return static_shared_bytes(); });
}
}  // namespace natgen_emu
