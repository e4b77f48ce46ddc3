"""Run code written for natten <= 0.17's unfused ops on natgen, without natten and without touching site-packages.

    import natgen.compat
    natgen.compat.patch_natten()          # `from natten.functional import natten2dqkrpb, natten2dav` -> natgen
    natgen.compat.patch_transformers()    # transformers' DiNAT / NAT models run on natgen
    natgen.compat.patch_transformers(fused=True, backend="reference")   # ... through the fused op instead

patch_natten adds an import hook (a finder at the end of sys.meta_path) that serves the modules `natten` and
`natten.functional` from natgen.functional. It only serves them where no other finder does, so an installed
natten still wins; it returns whether the hook serves natten. patch_transformers also tells transformers
that a natten is available and rebinds the natten names its DiNAT and NAT modules imported (they bind them when
they are first imported, possibly before the hook existed). With fused=True the models' neighborhood-attention
layers call natgen's fused op (natgen.na2d with rpb) instead of qk, softmax and av, wherever that computes the
same thing: no attention probabilities requested, no attention dropout active (else the layer runs unfused).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

from . import functional

SHIM_VERSION = "0.17.0+natgen"
# natten's unfused op names natgen.functional provides (natten 0.15-0.17's na*_qk / na*_av and the older names)
NATTEN_FUNCTIONS = tuple(functional.__all__)
# the transformers modules that import natten's ops at module level
TRANSFORMERS_MODULES = ("transformers.models.dinat.modeling_dinat", "transformers.models.deprecated.nat.modeling_nat")


class _NattenShim(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `natten` (a package) and `natten.functional` from natgen.functional."""

    NAMES = ("natten", "natten.functional")

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.NAMES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname == "natten")

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        module.__version__ = SHIM_VERSION
        module.__natgen_shim__ = True
        for name in NATTEN_FUNCTIONS:
            setattr(module, name, getattr(functional, name))
        if module.__name__ == "natten":
            module.__path__ = []
            module.functional = importlib.import_module("natten.functional")


_SHIM = _NattenShim()


def natten_is_shimmed() -> bool:
    module = sys.modules.get("natten")
    return module is not None and getattr(module, "__natgen_shim__", False)


def patch_natten() -> bool:
    """Install the natten import hook (once). Returns True where `import natten` gives natgen's shim, False
    where a real natten is installed (it is then left alone)."""
    if "natten" in sys.modules:
        return natten_is_shimmed()
    spec = importlib.util.find_spec("natten")
    if spec is not None and spec.loader is not _SHIM:
        return False  # a real natten
    if _SHIM not in sys.meta_path:
        sys.meta_path.append(_SHIM)
    return True


def unpatch_natten() -> None:
    """Remove the hook and forget the shim's modules (a real natten installed later imports normally)."""
    if _SHIM in sys.meta_path:
        sys.meta_path.remove(_SHIM)
    for name in _NattenShim.NAMES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__natgen_shim__", False):
            del sys.modules[name]


def _fused_forward(unfused_forward, backend):
    """A NeighborhoodAttention.forward of transformers' DiNAT/NAT that runs natgen's fused op (heads-last), its
    bias the layer's rpb; the layer's own forward where fused attention would not compute what it returns."""
    from .ops import na2d

    def forward(self, hidden_states, output_attentions=False):
        if output_attentions or (self.training and self.dropout.p > 0):
            return unfused_forward(self, hidden_states, output_attentions)
        shape = (*hidden_states.shape[:-1], self.num_attention_heads, self.attention_head_size)
        q, k, v = (layer(hidden_states).view(shape) for layer in (self.query, self.key, self.value))
        out = na2d(q, k, v, self.kernel_size, dilation=getattr(self, "dilation", 1), rpb=self.rpb,
                   scale=self.attention_head_size ** -0.5, backend=backend)
        return (out.reshape(*hidden_states.shape[:-1], self.all_head_size),)

    forward.__natgen_fused__ = True
    forward.__wrapped__ = unfused_forward
    return forward


def patch_transformers(fused: bool = False, backend=None) -> list:
    """Make transformers' DiNAT and NAT models run natgen's ops; returns the transformers modules patched.

    fused=False: natten's unfused names (natgen.functional). fused=True: natgen's fused op with `backend`
    (None: the best available). Needs transformers (the `compat` extra). Where a real natten is installed
    nothing changes."""
    if not patch_natten():
        return []
    import_utils = importlib.import_module("transformers.utils.import_utils")
    import_utils._natten_available = True  # what transformers' requires_backends(..., ["natten"]) reads
    natten_functional = importlib.import_module("natten.functional")
    patched = []
    for name in TRANSFORMERS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # a transformers without this model
        for function in ("natten1dqkrpb", "natten1dav", "natten2dqkrpb", "natten2dav"):
            if hasattr(module, function):
                setattr(module, function, getattr(natten_functional, function))
        layer = module.NeighborhoodAttention
        unfused_forward = getattr(layer.forward, "__wrapped__", layer.forward)
        layer.forward = _fused_forward(unfused_forward, backend) if fused else unfused_forward
        patched.append(name)
    return patched
