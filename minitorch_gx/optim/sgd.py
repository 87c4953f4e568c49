"""SGD with momentum and weight decay over flat buffers.

At construction every parameter is copied into one contiguous array and its
``.data`` becomes a view into it; gradients and momentum buffers get the same
layout. A step is then a handful of whole-array operations (or one CUDA
launch) instead of a Python loop over 161 tensors, and the data-parallel
allreduce can work on the flat gradient directly.

Parameter groups (PyTorch's ``[{"params": [...], "weight_decay": 0}, ...]``)
are contiguous slices of the flat arrays, so weight decay can skip batch-norm
parameters and biases.

Update (PyTorch's, dampening 0, not Nesterov), per element:
    d   = g + weight_decay * p
    buf = momentum * buf + d          (buf starts at 0, so the first buf is d)
    p   = p - lr * buf
"""
import numpy

from .. import backend, cpu
from ..cuda import device as cuda_device, sgd as cuda_sgd


def sgd_update_reference(p, g, buf, lr, momentum, weight_decay):
    """The specification of one group's update, in place on ``p`` and ``buf``."""
    d = g + weight_decay * p
    if momentum:
        buf[...] = momentum * buf + d
        d = buf
    p -= lr * d


def _sgd_update_fast(p, g, buf, lr, momentum, weight_decay, scratch):
    """In place, with no temporaries beyond ``scratch``; on the CPU piece by
    piece over the threads (``cpu.elementwise``: the element's arithmetic is
    the same whatever the pieces, and each piece stays in cache through its
    five passes)."""
    if backend.get_array_module(p) is numpy and p.ndim == 1 and all(
            a.flags.c_contiguous for a in (p, g, buf, scratch)):
        cpu.elementwise(lambda p, g, buf, scratch: _sgd_passes(
            p, g, buf, lr, momentum, weight_decay, scratch), p, g, buf, scratch)
    else:
        _sgd_passes(p, g, buf, lr, momentum, weight_decay, scratch)


def _sgd_passes(p, g, buf, lr, momentum, weight_decay, scratch):
    xp = backend.get_array_module(p)
    if momentum:
        buf *= momentum
        buf += g
        if weight_decay:
            xp.multiply(p, p.dtype.type(weight_decay), out=scratch)
            buf += scratch
        xp.multiply(buf, p.dtype.type(lr), out=scratch)
    else:
        xp.multiply(p, p.dtype.type(weight_decay), out=scratch)
        scratch += g
        scratch *= p.dtype.type(lr)
    p -= scratch


class SGD:
    """``SGD(params, lr, momentum=0, weight_decay=0)`` as ``torch.optim.SGD``.

    ``params`` is an iterable of Parameters or of dicts with a "params" list and
    optional "lr", "momentum", "weight_decay" overriding the defaults. Create
    the optimizer after the model has its final dtype and device: parameters
    then live in the optimizer's flat buffer.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        params = list(params)
        if not params:
            raise ValueError("SGD got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self.param_groups = []
        for group in params:
            g = dict(defaults)
            g.update(group)
            g["params"] = list(g["params"])
            self.param_groups.append(g)
        self._flatten()

    def _flatten(self):
        all_params = [p for g in self.param_groups for p in g["params"]]
        if len({id(p) for p in all_params}) != len(all_params):
            raise ValueError("a parameter appears in more than one parameter group")
        first = all_params[0].data
        xp = backend.get_array_module(first)
        dtypes = {p.dtype for p in all_params}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype, found {sorted(map(str, dtypes))}")
        n = sum(p.size for p in all_params)
        self.flat_params = xp.empty(n, first.dtype)
        self.flat_grads = xp.zeros(n, first.dtype)
        self.flat_momentum = xp.zeros(n, first.dtype)
        self._scratch = xp.empty(n, first.dtype)
        self._slices = []        # per group: (start, end) in the flat arrays
        self._params = all_params
        self._views = []         # per parameter: (data view, grad view, momentum view)
        offset = 0
        for group in self.param_groups:
            start = offset
            for p in group["params"]:
                end = offset + p.size
                data = self.flat_params[offset:end].reshape(p.shape)
                data[...] = p.data
                p.data = data
                grad = self.flat_grads[offset:end].reshape(p.shape)
                if p.grad is not None:
                    grad[...] = p.grad
                p.grad = grad
                self._views.append((data, grad, self.flat_momentum[offset:end].reshape(p.shape)))
                offset = end
            self._slices.append((start, offset))

    def _gather_grads(self):
        """Make sure every p.grad is its view of the flat gradient (user code
        may have set it to None or to a new array)."""
        for p, (data, grad, _) in zip(self._params, self._views):
            if p.data is not data:
                raise RuntimeError("a parameter's .data was replaced after the optimizer was "
                                   "created (model.to(...) after SGD(...)?): create SGD last")
            if p.grad is not grad:
                if p.grad is None:
                    grad[...] = 0
                else:
                    grad[...] = p.grad
                p.grad = grad

    def nonfinite(self, loss=None):
        """A 0-d array on the parameters' device, nonzero when ``loss`` or any
        gradient holds a NaN or an infinity (a boolean on the NumPy path; with
        the kernels, one launch that counts them). One pass over the flat
        gradient, and nothing is read back to the host, so on a GPU the check
        costs no synchronisation: hand it to ``step(skip=...)`` and read it
        when convenient."""
        self._gather_grads()
        xp = backend.get_array_module(self.flat_grads)
        if loss is not None and backend.use_kernels(xp):  # one kernel (sgd.cu count_nonfinite)
            return cuda_sgd.count_nonfinite(self.flat_grads, xp.asarray(loss))
        bad = ~xp.isfinite(self.flat_grads).all()
        if loss is not None:
            bad = bad | ~xp.isfinite(loss)
        return bad

    def zero_grad(self):
        """One fill of the flat gradient; every parameter's ``grad`` is its view
        of it, marked zero, so that backward may write the first gradient
        straight into it (``Function.grad_buffer``)."""
        if backend.use_kernels(backend.get_array_module(self.flat_grads)):
            cuda_device.device_for(self.flat_grads).zero_fill(self.flat_grads)  # a memset
        else:
            self.flat_grads.fill(0)
        for p, (_, grad, _) in zip(self._params, self._views):
            p.grad = grad
            p.grad_is_zero = True

    def step(self, skip=None):
        """Update every parameter from its gradient. ``skip``: a 0-d array (such
        as ``nonfinite()``'s); where it is nonzero the step changes nothing. The
        kernel reads it on the device; the NumPy paths read it on the host."""
        self._gather_grads()
        impl = backend.choose(self.flat_params, reference=self._step_reference,
                              fast=self._step_fast, kernel=self._step_kernel)
        if impl == self._step_kernel:  # (bound methods: equal, never identical)
            impl(skip)  # the kernel reads skip on the device: no host read
        elif skip is None or not bool(skip):
            impl()

    def _step_reference(self):
        for group, (start, end) in zip(self.param_groups, self._slices):
            p, g, buf = (a[start:end] for a in (self.flat_params, self.flat_grads,
                                                self.flat_momentum))
            sgd_update_reference(p, g, buf, group["lr"], group["momentum"], group["weight_decay"])

    def _step_fast(self):
        for group, (start, end) in zip(self.param_groups, self._slices):
            p, g, buf = (a[start:end] for a in (self.flat_params, self.flat_grads,
                                                self.flat_momentum))
            _sgd_update_fast(p, g, buf, group["lr"], group["momentum"], group["weight_decay"],
                             self._scratch[start:end])

    def _step_kernel(self, skip=None):
        # one launch of kernels/sgd.cu updates every group; it reads `skip` itself
        ends, lrs, wds, moms = self._group_arrays()
        ends, wds, moms = self._device_tables(ends, wds, moms)
        cuda_sgd.sgd_momentum_update(self.flat_params, self.flat_grads, self.flat_momentum,
                                     ends, lrs, wds, moms, skip=skip)

    _tables = None

    def _device_tables(self, ends, wds, moms):
        """The groups' ends, weight decays and momenta on the device, copied
        there once and again only when they change (the learning rates change
        every step: they travel each time, a few bytes)."""
        key = (ends.tobytes(), wds.tobytes(), moms.tobytes())
        if self._tables is None or self._tables[0] != key:
            if int(ends[-1]) != self.flat_params.size:
                raise RuntimeError("SGD: the parameter groups no longer cover the flat buffer")
            dev = cuda_device.device_for(self.flat_params)
            dtype = self.flat_params.dtype
            self._tables = (key, dev.input(ends, numpy.int64), dev.input(wds, dtype),
                            dev.input(moms, dtype))
        return self._tables[1:]

    def _group_arrays(self):
        """Per-group end offsets and scalars, as the fused CUDA kernel takes
        them (host arrays: a few bytes copied per step, no device read-back)."""
        dtype = self.flat_params.dtype
        ends = numpy.asarray([end for _, end in self._slices], dtype=numpy.int64)
        lrs = numpy.asarray([g["lr"] for g in self.param_groups], dtype=dtype)
        wds = numpy.asarray([g["weight_decay"] for g in self.param_groups], dtype=dtype)
        moms = numpy.asarray([g["momentum"] for g in self.param_groups], dtype=dtype)
        return ends, lrs, wds, moms

    # -- state -----------------------------------------------------------
    def state_dict(self):
        """``{"state": {i: {"momentum_buffer": array}}, "param_groups": [...]}``
        as PyTorch lays it out (parameters numbered across groups)."""
        state = {i: {"momentum_buffer": views[2].copy()} for i, views in enumerate(self._views)}
        groups, index = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({"lr": g["lr"], "momentum": g["momentum"],
                           "weight_decay": g["weight_decay"], "params": list(range(index, index + n))})
            index += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match this optimizer's parameter groups")
        for g, saved in zip(self.param_groups, groups):
            for key in ("lr", "momentum", "weight_decay"):
                g[key] = saved[key]
        for i, (_, _, buf) in enumerate(self._views):
            saved = state_dict["state"].get(i, {}).get("momentum_buffer")
            if saved is None:
                buf[...] = 0
                continue
            if tuple(saved.shape) != buf.shape:
                raise ValueError(f"momentum buffer {i} has shape {tuple(saved.shape)}, "
                                 f"expected {buf.shape}")
            xp = backend.get_array_module(buf)
            buf[...] = xp.asarray(backend.to_numpy(saved))
