"""Fixtures shared by the op tests. A test module that sets

    KERNEL_FILES = ("batch_norm.cu",)
    BLOCK_SIZES = {"default": {}, "64-threads": {"BN_THREADS": 64}}

gets its emulator builds compiled at once (one g++ per core) before its first
emulated case, and a ``block_size`` fixture running each test at every entry
of BLOCK_SIZES (compile-time ``LAUNCH`` shapes).

Every emulated case runs with all the emulator's checks (memcheck, racecheck,
initcheck, synccheck: the default) and under one of its schedules, index
order, reversed or seeded random, picked from the test's id, so that the
cases of each kernel together run it in every order."""
import zlib

import numpy
import pytest

from minitorch_gx.cuda import device as cuda_device, emulator
from tests.backends import launch_shapes


@pytest.fixture(scope="module")
def _emulator_builds(request):
    files = getattr(request.module, "KERNEL_FILES", ())
    specs = []
    for threads in getattr(request.module, "BLOCK_SIZES", {"default": {}}).values():
        with launch_shapes(**threads):
            specs += [s for s in cuda_device.builds(numpy.float32) if s[0] in files]
    specs += [s for s in cuda_device.builds(numpy.float64) if s[0] in files]
    emulator.prebuild(specs)


@pytest.fixture(autouse=True)
def _prebuild_and_schedule_when_emulated(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("impl") != "emulated":
        yield
        return
    request.getfixturevalue("_emulator_builds")
    crc = zlib.crc32(request.node.nodeid.encode())
    with emulator.schedule(emulator.SCHEDULES[crc % len(emulator.SCHEDULES)], seed=crc):
        yield


def pytest_generate_tests(metafunc):
    if "block_size" in metafunc.fixturenames:
        metafunc.parametrize("block_size", list(metafunc.module.BLOCK_SIZES), indirect=True)


@pytest.fixture
def block_size(request):
    with launch_shapes(**request.module.BLOCK_SIZES[request.param]):
        yield request.param
