"""propgen: a source-to-source propagation compiler for PyTorch.

``propgen.grad(f)`` reads ``f``'s source and generates readable Python for its forward and
backward pass; ``propgen.source(df)`` returns that code, which lives in a real file so that
breakpoints bind in it.
"""

from propgen.api import adjoint, grad, insert_grad_of, source
from propgen.autodiff import JVPFunction, autodiff, hvp
from propgen.errors import (
    ConfigurationError,
    PropgenError,
    UnresolvedNameError,
    UnsupportedSyntaxError,
)
from propgen.manager import PropagationManager, propagate
from propgen.propagators import (
    BackPropagator,
    BaselineProp,
    ChainProp,
    ComboProp,
    GSLoss,
    GSProp,
    LossProp,
    LRProp,
    Part,
    PauseProp,
    Propagator,
    ProxProp,
    ResampleProp,
    RPProp,
    SkipProp,
    SumProp,
    TotalProp,
)
from propgen.proxprop import ProxPropLayer, proxprop_module
from propgen.runtime import AbsoluteTarget
from propgen.sigprop import Monitor, SignalProp, SigProp, SigpropManager
from propgen.template import Registry, contribution, d, m, nondifferentiable, t, tangent

__version__ = "0.1.0"

__all__ = [
    "propagate",
    "PropagationManager",
    "Propagator",
    "BackPropagator",
    "RPProp",
    "LRProp",
    "TotalProp",
    "LossProp",
    "BaselineProp",
    "SkipProp",
    "PauseProp",
    "SumProp",
    "ComboProp",
    "ChainProp",
    "ResampleProp",
    "GSLoss",
    "GSProp",
    "ProxProp",
    "ProxPropLayer",
    "proxprop_module",
    "SignalProp",
    "SigProp",
    "SigpropManager",
    "Monitor",
    "AbsoluteTarget",
    "Part",
    "m",
    "contribution",
    "grad",
    "autodiff",
    "hvp",
    "JVPFunction",
    "t",
    "tangent",
    "source",
    "adjoint",
    "insert_grad_of",
    "d",
    "nondifferentiable",
    "Registry",
    "UnsupportedSyntaxError",
    "UnresolvedNameError",
    "PropgenError",
    "ConfigurationError",
]
