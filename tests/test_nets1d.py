"""Shape, gradient, size and deployability checks for the benchmark's 1-D reference models."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from shared.nets1d import (
    NETS1D,
    HalvingAvgPool1d,
    StemMaxPool1d,
    resnet1d_wang,
    xresnet1d,
    xresnet1d_small,
)

# Parameter counts for 12 leads / 5 classes, computed by hand from the benchmark's layer shapes
# (see shared/nets1d.py) and confirmed by counting; the ranges are a few per cent wide, so a
# changed width, depth or head fails them.
EXPECTED_PARAMS = {
    "resnet1d_wang": (0.45e6, 0.50e6),  # 473,349
    "xresnet1d101": (1.80e6, 1.95e6),  # 1,872,261
    "xresnet1d50": (0.90e6, 1.05e6),
    "xresnet1d_small": (0.25e6, 0.35e6),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: on a small, shared CPU box, intra-op threads only contend (2-3x
    slower under load). Restored afterwards so other test modules keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# xresnet1d50 shares every module type with xresnet1d101, so only its size is checked
@pytest.fixture(scope="module", params=["resnet1d_wang", "xresnet1d101", "xresnet1d_small"])
def named_model(request):
    torch.manual_seed(0)
    return request.param, NETS1D[request.param](num_classes=5, in_channels=12)


def test_registry_has_the_benchmark_models():
    assert {"resnet1d_wang", "xresnet1d101"} <= set(NETS1D)
    assert set(EXPECTED_PARAMS) == set(NETS1D)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_param_count(name):
    n = n_params(NETS1D[name](num_classes=5, in_channels=12))
    print(f"{name}: {n:,} parameters")
    lo, hi = EXPECTED_PARAMS[name]
    assert lo <= n <= hi, f"{name}: {n:,} parameters, expected {lo:,.0f}..{hi:,.0f}"


@pytest.mark.parametrize("shape", [(4, 12, 250), (2, 12, 1000), (2, 12, 64), (3, 12, 99)])
def test_forward_shape_and_finite(named_model, shape):
    _, model = named_model
    x = torch.randn(*shape)
    for mode in (model.train, model.eval):
        mode()
        y = model(x)
        assert y.shape == (shape[0], 5)
        assert torch.isfinite(y).all()


def test_backward_all_params_get_finite_grads(named_model):
    _, model = named_model
    model.train().zero_grad()
    model(torch.randn(4, 12, 250)).logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    model.zero_grad()


# A symbolic batch and record length is what deployment needs. It is checked on resnet1d_wang and
# on a two-stage xresnet, whose module types cover xresnet1d101's; the 101 itself is exported with
# static shapes, which costs a third less.
EXPORT_CASES = {
    "resnet1d_wang": (resnet1d_wang, True),
    "xresnet1d_2stage": (lambda: xresnet1d(layers=(1, 1)), True),
    "xresnet1d101": (NETS1D["xresnet1d101"], False),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export(name):
    build, dynamic = EXPORT_CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 12, 250)
    dims = None
    if dynamic:
        dims = ({0: torch.export.Dim("batch", max=4096), 2: torch.export.Dim("time", min=64, max=100_000)},)
    ep = torch.export.export(model, (x,), dynamic_shapes=dims)
    with torch.no_grad():
        for x in [x] + ([torch.randn(3, 12, 1001)] if dynamic else []):
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_friendly_pools_match_torch_pools():
    for t in (7, 8, 125):
        x = torch.randn(2, 3, t)
        torch.testing.assert_close(HalvingAvgPool1d()(x), nn.AvgPool1d(2, ceil_mode=True)(x))
        torch.testing.assert_close(StemMaxPool1d()(x), nn.MaxPool1d(3, stride=2, padding=1)(x))


def test_quantize_dynamic_close_to_fp32(named_model):
    _, model = named_model
    model.eval()
    x = torch.randn(4, 12, 250)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        y, yq = model(x), q(x)
    assert not any(type(m) is nn.Linear for m in q.modules())
    # int8 weights and activations in the two head Linears cost ~1-6 % relative error on these
    # untrained nets (measured over seeds); 10 % still catches a broken or skipped conversion
    rel = ((yq - y).norm() / y.norm()).item()
    assert rel < 0.10, f"relative error {rel:.3f}"


def test_prune_conv_weights():
    torch.manual_seed(0)
    model = resnet1d_wang().eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    for m in convs:
        prune.l1_unstructured(m, "weight", amount=0.5)
    zeros = sum((m.weight == 0).sum().item() for m in convs)
    total = sum(m.weight.numel() for m in convs)
    assert abs(zeros / total - 0.5) < 0.01
    for m in convs:
        prune.remove(m, "weight")
    assert torch.isfinite(model(torch.randn(2, 12, 250))).all()


def test_xresnet_zero_init_makes_blocks_identity_like():
    """Last BN of every residual branch starts at zero scale (the 'bag of tricks' init)."""
    model = xresnet1d_small()
    for stage in model.stages:
        for block in stage:
            assert torch.all(block.convs[-1][1].weight == 0)


def test_options():
    # benchmark convention: an int kernel k means [k, k // 2 + 1]
    m = resnet1d_wang(kernel_size=5, stride=1, num_classes=3, in_channels=1)
    assert m(torch.randn(2, 1, 100)).shape == (2, 3)
    assert m.blocks[0].conv2.kernel_size == (3,)
    half = xresnet1d(layers=(1, 1), expansion=4, width_mult=0.5)
    assert half(torch.randn(2, 12, 100)).shape == (2, 5)
    assert n_params(half) < n_params(xresnet1d_small())
    basic = xresnet1d(layers=(2, 2, 2, 2), expansion=1)  # xresnet1d18-style blocks
    assert basic(torch.randn(2, 12, 100)).shape == (2, 5)
