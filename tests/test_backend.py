"""backend.py: the TF32 switch of cuBLAS (``--tf32``)."""
import numpy
import pytest

from minitorch_gx import backend
from tests.backends import needs_gpu


@needs_gpu
def test_tf32_is_set_both_ways_for_float32_gemms(monkeypatch):
    from cupy._core import _routines_linalg as linalg
    monkeypatch.setenv("CUPY_TF32", "1")  # the environment must not decide
    backend.set_tf32(False)
    assert linalg.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_DEFAULT
    backend.set_tf32(True)
    assert linalg.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_TF32
    backend.set_tf32(False)


@pytest.mark.skipif(backend.cupy is not None, reason="CuPy is installed here")
def test_tf32_without_cupy_says_it_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs CuPy and a GPU"):
        backend.set_tf32(True)
