"""Exceptions raised by natgen.emulator. Every fault of an emulated kernel is one of these, never a crash."""

from __future__ import annotations


class EmulatorError(Exception):
    """Base class. `kernel`, `block` and `thread` name where it happened (None when not applicable)."""

    def __init__(self, detail: str, kernel: str | None = None, block: tuple | None = None, thread: tuple | None = None):
        self.detail = detail
        self.kernel = kernel
        self.block = block
        self.thread = thread
        where = []
        if kernel is not None:
            where.append(f"kernel '{kernel}'")
        if block is not None:
            where.append(f"block {tuple(block)}")
        if thread is not None:
            where.append(f"thread {tuple(thread)}")
        super().__init__(f"{', '.join(where)}: {detail}" if where else detail)


class CompileError(EmulatorError):
    """The host compiler rejected the source; the message carries its diagnostics (file:line and the line)."""


class ArgumentError(EmulatorError, TypeError):
    """An argument does not match the kernel's parameter (count, dtype, device, range)."""


class LaunchConfigError(EmulatorError, ValueError):
    """Invalid grid/block dimensions, or an unknown kernel name."""


class BarrierError(EmulatorError):
    """__syncthreads not reached by every live thread of the block, or reached at different call sites."""


class DeadlockError(EmulatorError):
    """Every live thread of the block is blocked and none can be released."""


class WarpCollectiveError(EmulatorError):
    """Misuse of a warp-collective operation (mask, exited lanes, mixed operations, alignment)."""


class SharedMemoryError(EmulatorError):
    """A shared memory request above the 227 KB limit, or an access beyond the launch's dynamic size."""


class MemoryAccessError(EmulatorError):
    """A global load/store outside every tensor passed to the launch (checked mode), or a wild pointer."""


class StackOverflowError(EmulatorError):
    """A thread overflowed its fiber stack."""


class ArithmeticFault(EmulatorError):
    """SIGFPE inside the kernel (integer division by zero)."""


class KernelAbort(EmulatorError):
    """The kernel called abort(), failed an assert() or executed __trap()."""


class EmulatorTimeout(EmulatorError):
    """The launch ran longer than its `timeout`."""


class RaceError(EmulatorError):
    """racecheck: two threads accessed one byte, at least one writing, with nothing ordering the accesses.

    `thread` made the second access; `other_thread` (of `other_block`) the first. The message names the
    memory (shared array or offset, or argument and offset) and both source lines."""

    def __init__(self, detail: str, kernel: str | None = None, block: tuple | None = None,
                 thread: tuple | None = None, other_block: tuple | None = None, other_thread: tuple | None = None):
        super().__init__(detail, kernel, block, thread)
        self.other_block = other_block
        self.other_thread = other_thread


class UninitializedReadError(EmulatorError):
    """initcheck: a read of a shared memory byte that no thread of the block has written in this launch."""


# Indexed by natgen_emu::FaultKind (runtime/emulator/natgen_emu.h).
FAULT_CLASSES = {
    1: BarrierError,
    2: DeadlockError,
    3: WarpCollectiveError,
    4: SharedMemoryError,
    5: MemoryAccessError,
    6: StackOverflowError,
    7: ArithmeticFault,
    8: KernelAbort,
    9: EmulatorTimeout,
    10: LaunchConfigError,
    11: RaceError,
    12: UninitializedReadError,
}
