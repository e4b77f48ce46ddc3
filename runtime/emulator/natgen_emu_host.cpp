// natgen_emu_host.cpp: the one pybind11 extension of natgen.emulator, compiled once per cache directory
// (and compiler / Python / pybind11 version). It dlopen()s the per-source kernel modules, which export
// only the plain C table of natgen_emu_abi.h, so that no per-source compile pays for pybind11.
//
//   KernelModule(path, expected_cache_key)   raises ImportError for anything that is not the module
//                                            compiled for that key (truncated file, foreign module, ...)
//     .cache_key, .path
//     .kernels()  -> [(name, blob_size, [(is_pointer, type_code, size, offset), ...]), ...]
//     .launch(name, grid, block, shared_mem, seed|None, checked, timeout, blob, regions, fixups, racecheck, initcheck)
//         regions: [(host_address, nbytes, label)], fixups: [(blob_offset, region_index, offset_in_region)]
//         racecheck: 0 off, 1 shared memory, 2 shared and global memory
//         returns None, or (fault_kind, message, block, thread|None, (other_block, other_thread)|None)
//     .sanitized  (built with the racecheck/initcheck instrumentation)
//     .static_shared_bytes()
#include <dlfcn.h>

#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>

#include "natgen_emu_abi.h"

#ifndef NATGEN_EMU_HOST_MODULE
#error "compile with -DNATGEN_EMU_HOST_MODULE=<extension module name>"
#endif

namespace py = pybind11;

namespace {

py::tuple dim3_tuple(const unsigned v[3]) { return py::make_tuple(v[0], v[1], v[2]); }

void tuple_dim3(const py::tuple& t, unsigned out[3]) {
    for (int i = 0; i < 3; ++i) out[i] = t[size_t(i)].cast<unsigned>();
}

class KernelModule {
public:
    KernelModule(const std::string& path, const std::string& expected_key) : path_(path) {
        void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!handle) {
            const char* err = dlerror();
            throw py::import_error("cannot load " + path + ": " + (err ? err : "dlopen failed"));
        }
        auto entry = reinterpret_cast<natgen_emu_module_fn>(dlsym(handle, NATGEN_EMU_MODULE_SYMBOL));
        const natgen_emu_module* module = entry ? entry() : nullptr;
        std::string problem;
        if (!module)
            problem = "is not an emulated kernel module (no " NATGEN_EMU_MODULE_SYMBOL ")";
        else if (module->abi_version != NATGEN_EMU_ABI_VERSION)
            problem = "was built for another emulator ABI";
        else if (!module->cache_key || expected_key != module->cache_key)
            problem = "holds a module for another source";
        if (!problem.empty()) {
            dlclose(handle);  // built with -fno-gnu-unique, so this unloads it and a rebuilt file can load
            throw py::import_error(path + " " + problem);
        }
        // A module that loaded is never closed (like any extension module): it keeps its fiber stacks
        // and shared memory mapped for the next launch, and other loads of the same path share it.
        module_ = module;
    }

    const std::string& path() const { return path_; }
    std::string cache_key() const { return module_->cache_key; }
    bool sanitized() const { return module_->sanitized != 0; }
    size_t static_shared_bytes() const { return module_->static_shared_bytes(); }

    py::list kernels() const {
        py::list out;
        for (size_t i = 0; i < module_->nkernels; ++i) {
            const natgen_emu_kernel& k = module_->kernels[i];
            py::list params;
            for (size_t j = 0; j < k.nparams; ++j) {
                const natgen_emu_param& p = k.params[j];
                params.append(py::make_tuple(bool(p.is_pointer), p.code, p.size, p.offset));
            }
            out.append(py::make_tuple(k.name, k.blob_size, params));
        }
        return out;
    }

    py::object launch(const std::string& name, const py::tuple& grid, const py::tuple& block, size_t shared_mem,
                      const py::object& seed, bool checked, double timeout, const py::bytes& blob,
                      const py::list& regions, const py::list& fixups, int racecheck, bool initcheck) const {
        size_t index = module_->nkernels;
        for (size_t i = 0; i < module_->nkernels; ++i)
            if (name == module_->kernels[i].name) index = i;
        if (index == module_->nkernels) throw py::key_error(name);
        unsigned grid3[3], block3[3];
        tuple_dim3(grid, grid3);
        tuple_dim3(block, block3);
        const std::string blob_bytes = blob;
        std::vector<std::string> labels;
        labels.reserve(regions.size());  // the region structs point into these strings
        std::vector<natgen_emu_region> specs;
        for (py::handle r : regions) {
            py::tuple t = py::reinterpret_borrow<py::tuple>(r);
            labels.push_back(t[2].cast<std::string>());
            specs.push_back(natgen_emu_region{t[0].cast<uintptr_t>(), t[1].cast<size_t>(), labels.back().c_str()});
        }
        std::vector<natgen_emu_fixup> fix;
        for (py::handle f : fixups) {
            py::tuple t = py::reinterpret_borrow<py::tuple>(f);
            fix.push_back(natgen_emu_fixup{t[0].cast<size_t>(), t[1].cast<int>(), t[2].cast<size_t>()});
        }
        const bool has_seed = !seed.is_none();
        const uint64_t seed_value = has_seed ? seed.cast<uint64_t>() : 0;
        natgen_emu_fault fault{};
        const int status = module_->launch(index, reinterpret_cast<const unsigned char*>(blob_bytes.data()),
                                           blob_bytes.size(), grid3, block3, shared_mem, has_seed, seed_value, checked,
                                           timeout, specs.data(), specs.size(), fix.data(), fix.size(), racecheck,
                                           initcheck ? 1 : 0, &fault);
        if (status == NATGEN_EMU_LAUNCH_NO_MEMORY) throw std::bad_alloc();
        if (status != NATGEN_EMU_LAUNCH_OK)
            throw std::runtime_error(std::string("emulator launch failed: ") + (fault.message ? fault.message : "?"));
        if (fault.kind == 0) return py::none();
        py::object thread = fault.has_thread ? py::object(dim3_tuple(fault.thread)) : py::object(py::none());
        py::object other = fault.has_other
                               ? py::object(py::make_tuple(dim3_tuple(fault.other_block), dim3_tuple(fault.other_thread)))
                               : py::object(py::none());
        return py::make_tuple(fault.kind, fault.message ? fault.message : "", dim3_tuple(fault.block), thread, other);
    }

private:
    std::string path_;
    const natgen_emu_module* module_ = nullptr;
};

}  // namespace

PYBIND11_MODULE(NATGEN_EMU_HOST_MODULE, m) {
    m.attr("abi_version") = NATGEN_EMU_ABI_VERSION;
    py::class_<KernelModule>(m, "KernelModule")
        .def(py::init<const std::string&, const std::string&>(), py::arg("path"), py::arg("expected_cache_key"))
        .def_property_readonly("path", &KernelModule::path)
        .def_property_readonly("cache_key", &KernelModule::cache_key)
        .def_property_readonly("sanitized", &KernelModule::sanitized)
        .def("kernels", &KernelModule::kernels)
        .def("launch", &KernelModule::launch)
        .def("static_shared_bytes", &KernelModule::static_shared_bytes);
}
