"""Module: a tree of layers holding parameters (learned) and buffers (state).

Attributes that are Parameters, Modules or registered buffers are found by
name, so ``named_parameters()`` and ``state_dict()`` produce the dotted names
PyTorch produces (``layer1.0.conv1.weight``), and weights move between the two
unchanged.
"""
from collections import OrderedDict

import numpy

from .. import backend
from ..autograd import Tensor


class Parameter(Tensor):
    """A Tensor that a Module learns: ``requires_grad`` is on."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class StateDictError(KeyError):
    """A state_dict does not fit the model: names the offending key."""

    def __str__(self):
        return str(self.args[0])


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration ----------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            self._buffers[name] = value  # e.g. ``self.num_batches_tracked += 1``
            object.__setattr__(self, name, value)
            return
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name, array):
        """State that is saved and moved with the model but not learned
        (batch norm's running statistics)."""
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def __getattr__(self, name):  # only called when normal lookup fails
        for table in ("_parameters", "_buffers", "_modules"):
            d = self.__dict__.get(table)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # -- traversal -------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def children(self):
        return iter(self._modules.values())

    def named_parameters(self, prefix=""):
        for mname, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                yield (f"{mname}.{name}" if mname else name), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self):
        for mname, m in self.named_modules():
            for name, b in m._buffers.items():
                yield (f"{mname}.{name}" if mname else name), b

    # -- modes -----------------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # -- calling ---------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args):
        raise NotImplementedError

    # -- state -----------------------------------------------------------
    def state_dict(self):
        """Name -> array for every parameter and buffer, in registration order.

        The arrays are the model's own (not copies), as in PyTorch."""
        out = OrderedDict()
        for mname, m in self.named_modules():
            for name, p in m._parameters.items():
                out[f"{mname}.{name}" if mname else name] = p.data
            for name, b in m._buffers.items():
                out[f"{mname}.{name}" if mname else name] = b
        return out

    def load_state_dict(self, state, strict=True):
        """Copy arrays from ``state`` (name -> array-like) into the model.

        A missing, unexpected or wrongly shaped key raises ``StateDictError``
        naming it. Values are converted to each destination's dtype and device.
        """
        own = self.state_dict()
        if strict:
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            if missing:
                raise StateDictError(f"state_dict is missing key {missing[0]!r}"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            if unexpected:
                raise StateDictError(f"state_dict has unexpected key {unexpected[0]!r}"
                                     + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        for key, value in state.items():
            if key not in own:
                continue
            src = backend.to_numpy(value.data if isinstance(value, Tensor) else value)
            dst = own[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise StateDictError(f"state_dict key {key!r} has shape {tuple(src.shape)}, "
                                     f"the model expects {tuple(dst.shape)}")
            xp = backend.get_array_module(dst)
            dst[...] = xp.asarray(src.astype(dst.dtype, copy=False))
        return self

    def to(self, target):
        """``to(numpy.float64)`` casts floating parameters and buffers;
        ``to("gpu")`` / ``to("cpu")`` moves them, except integer buffers (the
        batch-norm step counter): they stay on the host, which updates them
        every step at no cost; on a GPU each ``+= 1`` would be a kernel launch
        (53 a step in ResNeXt50). Returns self."""
        if isinstance(target, str):
            def convert(a):
                if a.dtype.kind in "iub":
                    return backend.to_numpy(a)
                return backend.to_device(a, target)
        else:
            dtype = numpy.dtype(target)

            def convert(a):
                return a.astype(dtype) if a.dtype.kind == "f" else a
        for m in self.modules():
            for p in m._parameters.values():
                p.data = convert(p.data)
                if p.grad is not None:
                    p.grad = convert(p.grad)
            for name in list(m._buffers):
                m.register_buffer(name, convert(m._buffers[name]))
        return self

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        lines.append(")")
        return "\n".join(lines) if self._modules else f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self):
        return ""
