"""Top-n projections with pytest-benchmark: the deeper net on one 256x256 image, and a ResNet-18 on one
224x224 RGB image (projected through its graph from layer4).

    .venv/bin/python -m pytest benchmarks/bench_projection.py --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,rounds

One group per net and thread count: xraydeconv's DeconvNet (sparse kernel, dense PyTorch path, bf16 walk), the
plain-PyTorch deconvnets of ``projection_report.py`` (shared forward and batched unpool + transposed convs for
the deeper net; batched autograd with deconvnet ReLUs for the ResNet) and Captum's NeuronDeconvolution called
once per filter. ``projection_report.py`` prints the same comparisons as ratios measured interleaved in one
process.
"""

from __future__ import annotations

import pytest
import torch
from projection_report import _relu_of_last_conv, build_model, captum_zf, plain_autograd, plain_zf

from xraydeconv.explain.deconvnet import DeconvNet

TOP_N = 25


@pytest.fixture(scope="module")
def setup():
    model = build_model("deeper", "cpu")
    x = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    relu = _relu_of_last_conv(model.features)
    chans = DeconvNet(model).project(x, top_n=TOP_N).channels
    return model, x, relu, chans


@pytest.fixture(scope="module")
def resnet():
    model = build_model("resnet18", "cpu")
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    chans = DeconvNet(model).project(x, top_n=TOP_N).channels
    return model, x, chans


CONTENDERS = ["xraydeconv", "xraydeconv-dense", "xraydeconv-bf16", "plain", "captum"]


def _ours(model, x, name):
    dn = DeconvNet(model, sparse=name != "xraydeconv-dense")
    precision = "bf16" if name.endswith("bf16") else "fp32"
    return lambda: dn.project(x, top_n=TOP_N, precision=precision)


@pytest.mark.parametrize("name", CONTENDERS)
def test_projection(benchmark, setup, threads, name):
    model, x, relu, chans = setup
    benchmark.group = f"top-{TOP_N} projection deeper 1x1x256x256 {threads}t"
    if name == "captum":
        pytest.importorskip("captum")
        fn = lambda: captum_zf(model, relu, x, chans)  # noqa: E731
    elif name == "plain":
        fn = lambda: plain_zf(model.features, x, TOP_N)  # noqa: E731
    else:
        fn = _ours(model, x, name)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("name", CONTENDERS)
def test_projection_resnet18(benchmark, resnet, threads, name):
    model, x, chans = resnet
    benchmark.group = f"top-{TOP_N} projection resnet18 1x3x224x224 {threads}t"
    if name == "captum":
        pytest.importorskip("captum")
        fn = lambda: captum_zf(model, model.layer4, x, chans)  # noqa: E731
    elif name == "plain":
        fn = lambda: plain_autograd(model, model.layer4, x, chans)  # noqa: E731
    else:
        fn = _ours(model, x, name)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
