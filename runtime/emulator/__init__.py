"""natgen.emulator: run CUDA kernel source on the CPU.

    from natgen.emulator import launch
    launch(source, "my_kernel", grid=(32,), block=(256,), args=[q, k, out, n, scale])

The source is the text nvcc compiles (it includes templates/natgen_device.cuh); it is compiled with the
host C++ compiler against natgen_emu.h, cached on disk ($NATGEN_CACHE_DIR/emulator or
~/.cache/natgen/emulator), and every CUDA thread runs as a cooperatively scheduled fiber. Faults of the
kernel (barrier divergence, deadlock, out-of-bounds access, ...) raise EmulatorError subclasses.

The emulator is also a sanitizer (natgen_emu_check.h has the model):
  * racecheck=True ("shared"): two threads accessing one shared memory byte, at least one writing, with no
    __syncthreads (or, inside a warp, no __syncwarp / shuffle / vote) between them raise RaceError, which
    names the kernel, the block, both threads, the shared variable and byte, and both source lines.
    racecheck="global" checks the launch's tensors too (conflicts between blocks, or threads of a block,
    without an atomic); reads by many threads are never a conflict.
  * initcheck=True: a read (plain, atomic or ldmatrix) of a shared memory byte that no thread of the block
    has written in this launch raises UninitializedReadError.
  * cp.async copies land at the cp_async_wait<N> that covers their group, as on the device, never at
    issue: before that their destination keeps its old bytes, and under racecheck touching it is a race.
  * seed=N runs the threads in a shuffled (reproducible) order between synchronisation points.
The checked launches use a second build of the source, instrumented with -fsanitize=thread (whose hooks
natgen_emu_check.h implements); it runs a few times slower than the plain one.

Environment (read when the corresponding launch() argument is None, so whole test tiers and the op
layer's calls can run checked without passing anything):
    NATGEN_EMU_SEED=<int>                    schedule seed (unset or empty: threads in index order)
    NATGEN_EMU_RACECHECK=1 | shared | global racecheck (0 or unset: off)
    NATGEN_EMU_INITCHECK=1                   initcheck (0 or unset: off)
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
    RaceError,
    SharedMemoryError,
    StackOverflowError,
    UninitializedReadError,
    WarpCollectiveError,
)
from .launch import launch

__all__ = [
    "launch", "load_source", "compile_to_cache", "find_kernels", "cache_dir", "clear_memory_cache", "stats",
    "EmulatorError", "CompileError", "ArgumentError", "LaunchConfigError", "BarrierError", "DeadlockError",
    "WarpCollectiveError", "SharedMemoryError", "MemoryAccessError", "StackOverflowError", "ArithmeticFault",
    "KernelAbort", "EmulatorTimeout", "RaceError", "UninitializedReadError",
]
