"""natgen.emulator: run CUDA kernel source on the CPU.

    from natgen.emulator import launch
    launch(source, "my_kernel", grid=(32,), block=(256,), args=[q, k, out, n, scale])

The source is the text nvcc compiles (it includes templates/natgen_device.cuh); it is compiled with the
host C++ compiler against natgen_emu.h, cached on disk ($NATGEN_CACHE_DIR/emulator or
~/.cache/natgen/emulator), and every CUDA thread runs as a cooperatively scheduled fiber. Faults of the
kernel (barrier divergence, deadlock, out-of-bounds access, ...) raise EmulatorError subclasses.
"""

from .build import cache_dir, clear_memory_cache, compile_to_cache, find_kernels, load_source, stats
from .errors import (
    ArgumentError,
    ArithmeticFault,
    BarrierError,
    CompileError,
    DeadlockError,
    EmulatorError,
    EmulatorTimeout,
    KernelAbort,
    LaunchConfigError,
    MemoryAccessError,
    SharedMemoryError,
    StackOverflowError,
    WarpCollectiveError,
)
from .launch import launch

__all__ = [
    "launch", "load_source", "compile_to_cache", "find_kernels", "cache_dir", "clear_memory_cache", "stats",
    "EmulatorError", "CompileError", "ArgumentError", "LaunchConfigError", "BarrierError", "DeadlockError",
    "WarpCollectiveError", "SharedMemoryError", "MemoryAccessError", "StackOverflowError", "ArithmeticFault",
    "KernelAbort", "EmulatorTimeout",
]
