"""The "emulator" backend: the CUDA instance the selector picks for an arch, run on the CPU by natgen.emulator.

It runs exactly the launch plan a GPU would get (natgen.launch), so it checks the generated CUDA source,
the plan and the argument packing together. The emulator's sanitizer settings and schedule seed come from
its own environment variables unless a seed is given here.
"""
from __future__ import annotations

from typing import Optional

from . import selector
from .launch import BackwardCall, KernelCall
from .manifest import Instance
from .problem import Problem
from .registry import Backend, Resolved, register_backend

DEFAULT_ARCH = "sm_80"


def available() -> bool:
    try:
        from . import emulator
        return hasattr(emulator, "launch")
    except ImportError:
        return False


def emulator_launcher(instance: Instance, plan, seed: Optional[int] = None, symbol: Optional[str] = None):
    """launcher(tensors) for KernelCall or BackwardCall through the emulator (natgen.emulator.launch as it is
    when resolved); `symbol` names an entry point other than the instance's own."""
    from . import emulator
    launch = emulator.launch
    source = instance.source_path.read_text()
    symbol = symbol or instance.entry["symbol"]
    extra = {} if seed is None else {"seed": seed}
    grid, block, shared_mem, bind = plan.grid, plan.block, plan.shared_mem, plan.bind

    def run(tensors):
        launch(source, symbol, grid, block, bind(tensors), shared_mem=shared_mem, **extra)

    return run


def kernel_call(instance: Instance, problem: Problem, seed: Optional[int] = None) -> KernelCall:
    call = KernelCall(instance, problem)
    call.launcher = emulator_launcher(instance, call.plan, seed)
    return call


def backward_call(instance: Instance, problem: Problem, seed: Optional[int] = None) -> BackwardCall:
    return BackwardCall(instance, problem,
                        lambda symbol, plan: emulator_launcher(instance, plan, seed, symbol))


class EmulatedCall(Resolved):
    def __init__(self, problem: Problem, arch: Optional[str] = None, seed: Optional[int] = None):
        target = selector.Target("cuda", arch or DEFAULT_ARCH)
        forward = selector.select("fwd", problem, target).instance
        backward, self.backward_reason = selector.backward_or_reason(forward, problem, target)
        super().__init__("emulator", forward, backward)
        self.problem, self.seed = problem, seed
        self._backward_call = None
        self.call = kernel_call(forward, problem, seed)
        self.forward = self.call  # (q, k, v, extra_k=None, extra_v=None) -> (out, lse)

    def backward(self, q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb=None):
        if self.backward_instance is None:
            return None
        if self._backward_call is None:
            self._backward_call = backward_call(self.backward_instance, self.problem, self.seed)
        return self._backward_call(q, k, v, extra_k, extra_v, out, lse, grad_out, grad_lse, rpb)


def resolve(problem: Problem, arch: Optional[str] = None) -> EmulatedCall:
    return EmulatedCall(problem, arch)


register_backend(Backend("emulator", "cpu", available, resolve))
