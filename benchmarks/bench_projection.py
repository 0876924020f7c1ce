"""Top-n projection of one 256x256 image through the deeper net, with pytest-benchmark.

    .venv/bin/python -m pytest benchmarks/bench_projection.py --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,rounds

One group per thread count: xraydeconv's DeconvNet (sparse kernel, dense PyTorch path, bf16 walk), the
plain-PyTorch Zeiler & Fergus of ``projection_report.py`` and Captum's NeuronDeconvolution called once per
filter. ``projection_report.py`` prints the same comparison as ratios measured interleaved in one process.
"""

from __future__ import annotations

import pytest
import torch
from projection_report import _relu_of_last_conv, build_model, captum_zf, plain_zf

from xraydeconv.explain.deconvnet import DeconvNet

TOP_N = 25


@pytest.fixture(scope="module")
def setup():
    model = build_model("deeper", "cpu")
    x = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    relu = _relu_of_last_conv(model.features)
    chans = DeconvNet(model).project(x, top_n=TOP_N).channels
    return model, x, relu, chans


CONTENDERS = ["xraydeconv", "xraydeconv-dense", "xraydeconv-bf16", "plain", "captum"]


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
        dn = DeconvNet(model, sparse=name != "xraydeconv-dense")
        precision = "bf16" if name.endswith("bf16") else "fp32"
        fn = lambda: dn.project(x, top_n=TOP_N, precision=precision)  # noqa: E731
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
