"""resnext50_32x4d against torchvision's, in float64, with the same weights:
logits, loss, every parameter's gradient and the BN running statistics after
one training-mode step. Skips without torch/torchvision."""
import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx.functional import cross_entropy
from resnext.model import resnext50_32x4d

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def test_forward_backward_and_running_stats_match_torchvision():
    ours = resnext50_32x4d(seed=0, zero_init_residual=False).to(numpy.float64).train()
    theirs = torchvision.models.resnext50_32x4d().double().train()
    theirs.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in ours.state_dict().items()})
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((2, 3, 64, 64))
    labels = numpy.array([3, 7])

    logits = ours(mt.Tensor(x))
    loss = cross_entropy(logits, labels)      # no smoothing: the two conventions agree
    loss.backward()
    t_logits = theirs(torch.from_numpy(x))
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(labels))
    t_loss.backward()

    numpy.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=1e-9, atol=1e-10)
    assert float(loss.data) == pytest.approx(t_loss.item(), rel=1e-12)
    t_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        g = t_params[name].grad.numpy()
        numpy.testing.assert_allclose(p.grad, g, rtol=1e-7, atol=1e-9 * numpy.abs(g).max(),
                                      err_msg=name)
    t_state = theirs.state_dict()
    for name, v in ours.state_dict().items():
        numpy.testing.assert_allclose(v, t_state[name].numpy(), rtol=1e-9, atol=1e-12,
                                      err_msg=name)


def test_sgd_steps_match_torch():
    """Forward, backward and SGD (momentum, weight decay only on conv/fc
    weights) over two steps: the weights stay equal to PyTorch's."""
    from minitorch_gx.optim import SGD
    from resnext.trainer import param_groups

    ours = resnext50_32x4d(num_classes=10, seed=1).to(numpy.float64).train()
    theirs = torchvision.models.resnext50_32x4d(num_classes=10).double().train()
    theirs.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in ours.state_dict().items()})
    opt = SGD(param_groups(ours, 1e-4), lr=0.05, momentum=0.9)
    named = dict(theirs.named_parameters())
    t_opt = torch.optim.SGD(
        [{"params": [named[n] for n, p in ours.named_parameters() if p.ndim > 1], "weight_decay": 1e-4},
         {"params": [named[n] for n, p in ours.named_parameters() if p.ndim <= 1], "weight_decay": 0.0}],
        lr=0.05, momentum=0.9)
    rng = numpy.random.default_rng(1)
    for _ in range(2):
        x = rng.standard_normal((3, 3, 32, 32))
        labels = rng.integers(0, 10, 3)
        opt.zero_grad()
        cross_entropy(ours(mt.Tensor(x)), labels).backward()
        opt.step()
        t_opt.zero_grad()
        torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
        t_opt.step()
    for name, p in ours.named_parameters():
        numpy.testing.assert_allclose(p.data, named[name].detach().numpy(), rtol=1e-8, atol=1e-10,
                                      err_msg=name)
