"""Module bookkeeping: names, buffers, modes, state_dict errors, dtype moves."""
import numpy
import pytest

from minitorch_gx import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 2))


def test_names_follow_pytorch():
    names = list(Net().state_dict())
    assert names == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                     "bn.num_batches_tracked", "head.1.weight", "head.1.bias"]
    assert [n for n, _ in Net().named_parameters()] == [
        "conv.weight", "bn.weight", "bn.bias", "head.1.weight", "head.1.bias"]


def test_train_eval_propagate():
    net = Net().eval()
    assert all(not m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_load_state_dict_errors_name_the_key():
    net = Net()
    state = dict(net.state_dict())
    missing = dict(state)
    del missing["bn.running_var"]
    with pytest.raises(nn.StateDictError, match="missing key 'bn.running_var'"):
        Net().load_state_dict(missing)
    with pytest.raises(nn.StateDictError, match="unexpected key 'extra'"):
        Net().load_state_dict({**state, "extra": numpy.zeros(1)})
    bad = {**state, "conv.weight": numpy.zeros((4, 3, 1, 1))}
    with pytest.raises(nn.StateDictError, match=r"'conv.weight' has shape \(4, 3, 1, 1\)"):
        Net().load_state_dict(bad)


def test_load_state_dict_copies_values_exactly():
    a, b = Net(), Net()
    a.bn.running_mean[...] = numpy.arange(4)
    b.load_state_dict(a.state_dict())
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        numpy.testing.assert_array_equal(va, vb, err_msg=k)


def test_to_float64_moves_parameters_and_float_buffers():
    net = Net().to(numpy.float64)
    for name, value in net.state_dict().items():
        expected = numpy.int64 if name.endswith("num_batches_tracked") else numpy.float64
        assert value.dtype == expected, name
    assert net.bn.running_mean.dtype == numpy.float64


def test_num_batches_tracked_counts_training_calls():
    import minitorch_gx as mt
    net = Net()
    x = mt.Tensor(numpy.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(numpy.float32))
    net.bn(x)
    net.bn(x)
    assert int(net.state_dict()["bn.num_batches_tracked"]) == 2
    net.eval()
    net.bn(x)
    assert int(net.bn.num_batches_tracked) == 2
