"""The ratio report behind ``xraydeconv bench``, on tiny shapes so that it runs in a second."""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

from xraydeconv import ops
from xraydeconv.cli.bench import bench
from xraydeconv.errors import UserError
from xraydeconv.ops import pool_dispatch
from xraydeconv.reports import bench as bench_lib

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")

TINY = ((2, 4, 8, 8), (1, 3, 6, 10))


def test_report_rows_and_derived_figures():
    report = bench_lib.run_report(threads=[1], repeats=2, shapes=TINY)
    ops_seen = {r.op for r in report.rows}
    assert ops_seen == {"pool", "pool out=", "pool fwd+bwd", "pool bwd", "unpool", "unpool out="}
    assert len(report.rows) == len(ops_seen) * len(TINY) * len(bench_lib.LAYOUTS)
    row = report.rows[0]
    assert row.kernel_ms > 0 and row.native_ms > 0 and row.copy_ms > 0
    assert row.index_bytes == 8 * row.switch_bytes == 8 * 2 * 4 * 4 * 4
    assert row.speedup == pytest.approx(row.native_ms / row.kernel_ms)
    text = bench_lib.format_report(report)
    assert "speed-up" in text and "2x4x8x8" in text and "channels_last" in text
    assert report.machine["torch"] == torch.__version__


def test_paired_speedup_is_the_median_of_the_per_round_ratios():
    # a burst of load in round 2 slows both sides: the per-round ratios stay 2, 2, 2
    assert bench_lib.paired_speedup([2.0, 20.0, 2.0], [1.0, 10.0, 1.0]) == 2.0
    assert bench_lib.paired_speedup([3.0, 1.0, 4.0, 1.0], [1.0, 1.0, 1.0, 2.0]) == pytest.approx((1.0 + 3.0) / 2)


def test_time_interleaved_returns_one_median_per_function():
    calls = []
    med = bench_lib.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert set(med) == {"a", "b"} and all(v >= 0 for v in med.values())
    assert calls[:4] == ["a", "b", "a", "b"]  # interleaved, warm-up rounds first
    assert len(calls) == 2 * (2 + 3)


def test_cli_prints_the_table_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_lib, "QUICK_SHAPES", TINY)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench, ["--quick", "--threads", "1", "--repeats", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "unpool out=" in result.output and "machine:" in result.output
    data = json.loads(out.read_text())
    assert data["repeats"] == 2 and len(data["rows"]) == 6 * len(TINY) * 2
    assert {"speedup", "copy_fraction", "kernel_gbs"} <= set(data["rows"][0])
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temp file left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "positive"),
        (["--threads", "one"], "thread counts"),
        (["--repeats", "0"], "0"),
    ],
)
def test_cli_rejects_bad_options(args, message):
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 2 and message in result.output


def test_cli_names_a_missing_json_folder(tmp_path):
    result = CliRunner().invoke(bench, ["--quick", "--json", str(tmp_path / "nope" / "b.json")])
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == f"{tmp_path / 'nope'}: no such folder for the output"


def test_cli_refuses_a_device_as_json_before_timing(tmp_path):
    result = CliRunner().invoke(bench, ["--quick", "--json", "/dev/null"])
    assert isinstance(result.exception, UserError) and "not a regular file" in str(result.exception)
    assert "op" not in result.output  # no table: refused before any timing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cli_without_a_gpu():
    result = CliRunner().invoke(bench, ["--device", "cuda"])
    assert isinstance(result.exception, UserError) and "no CUDA device" in str(result.exception)


# ---------------------------------------------------------------------------------------------------------------
# The suite: the nets' pool layers, their training step, and the auto dispatch table derived from it


def test_net_pool_shapes_are_the_inputs_of_every_pool_layer():
    shapes = bench_lib.net_pool_shapes(sizes=(64,), batches=(1, 4))
    # every net halves the map at each pool: shallow 16/32/64 channels, deeper(-aug) 16/32/64/128
    expected_chw = [(16, 64, 64), (32, 32, 32), (64, 16, 16), (128, 8, 8)]
    assert list(shapes) == [(n, *chw) for n in (1, 4) for chw in expected_chw]
    assert shapes[(1, 16, 64, 64)] == "shallow, deeper, deeper-aug"
    assert shapes[(4, 128, 8, 8)] == "deeper, deeper-aug"


def test_net_relu_shapes_are_the_inputs_of_the_relus_not_fused_with_a_pool():
    shapes = bench_lib.net_relu_shapes(sizes=(64,), batches=(2,))
    # shallow's ReLUs all precede a pool; deeper(-aug) has one unfused ReLU per stage, at the stage's input size
    assert shapes == {(2, c, hw, hw): "deeper, deeper-aug" for c, hw in ((16, 64), (32, 32), (64, 16), (128, 8))}


def test_net_bn_relu_shapes_are_the_batchnorm_inputs_before_a_relu():
    # deeper(-aug): per stage a BatchNorm -> ReLU -> conv and a BatchNorm -> ReLU -> pool, at the stage's input size
    want = {(2, c, hw, hw): "deeper, deeper-aug" for c, hw in ((16, 64), (32, 32), (64, 16), (128, 8))}
    assert bench_lib.net_bn_relu_shapes(False, sizes=(64,), batches=(2,)) == want
    assert bench_lib.net_bn_relu_shapes(True, sizes=(64,), batches=(2,)) == want


def test_bn_relu_fns_give_the_same_gradients_both_ways():
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    for pool in (False, True):
        kernel, native = bench_lib.bn_relu_fns(x, pool)
        assert all(torch.equal(a, b) for a, b in zip(kernel(), native()))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bench_lib.bn_relu_fns(x, False)[0]()
    # the gradient arrives fresh, as in a training step: grad_x is written over it
    assert "xraydeconv::batch_norm_relu_backward_" in {e.name for e in prof.events()}


def test_pool_suite_rows_and_train_steps():
    rows = bench_lib.run_pool_suite(threads=[1], repeats=1, sizes=(16,), batches=(2,))
    n_shapes = len(bench_lib.net_pool_shapes((16,), (2,)))
    n_relus = len(bench_lib.net_relu_shapes((16,), (2,)))
    n_bns = sum(len(bench_lib.net_bn_relu_shapes(pool, (16,), (2,))) for pool in (False, True))
    assert len(rows) == (n_shapes * len(bench_lib.PASSES) + n_relus) * len(bench_lib.LAYOUTS) + n_bns
    assert {r.what for r in rows} == {"pool fwd", "pool fwd+bwd", "pool relu+fwd", "pool relu+fwd+bwd", "relu_ fwd+bwd",
                                      "bn+relu fwd+bwd", "bn+relu+pool fwd+bwd"}
    assert {r.layout for r in rows if r.what.startswith("bn+")} == {"channels_last"}
    assert {r.threads for r in rows} == {1}
    assert rows[0].speedup == pytest.approx(rows[0].native_ms / rows[0].kernel_ms)
    steps = bench_lib.run_train_steps(nets=("shallow",), threads=[1], repeats=1, px=16, batch=2)
    assert [(s.what, s.shape, s.layout) for s in steps] == [
        ("train step shallow kernel", (2, 1, 16, 16), "channels_last"),
        ("train step shallow auto", (2, 1, 16, 16), "channels_last"),
    ]
    text = bench_lib.format_suite(rows + steps, bench_lib.machine_info("cpu"), 1)
    assert "train step shallow" in text and "2x16x16x16" in text and "speed-up" in text


def _row(what, shape, layout, threads, kernel_ms, native_ms):
    return bench_lib.SuiteRow(what, shape, layout, threads, kernel_ms, native_ms, native_ms / kernel_ms)


def test_dispatch_table_needs_the_kernel_at_least_as_fast_at_every_thread_count():
    rows = [
        _row("pool fwd", (32, 16, 64, 64), "channels_last", 1, 1.0, 2.0),
        _row("pool fwd", (32, 16, 64, 64), "channels_last", 2, 1.0, 1.0),  # a tie counts as fast enough
        _row("pool fwd+bwd", (32, 16, 64, 64), "channels_last", 1, 1.0, 2.0),
        _row("pool fwd+bwd", (32, 16, 64, 64), "channels_last", 2, 2.1, 2.0),
        _row("pool fwd", (1, 8, 16, 16), "nchw", 1, 3.0, 2.0),
        _row("pool relu+fwd+bwd", (1, 8, 16, 16), "nchw", 1, 1.0, 2.0),
        _row("relu_ fwd+bwd", (32, 16, 64, 64), "channels_last", 1, 1.0, 1.5),
        _row("relu_ fwd+bwd", (32, 16, 64, 64), "channels_last", 2, 1.0, 0.9),
        _row("relu_ fwd+bwd", (32, 16, 64, 64), "nchw", 1, 1.0, 1.1),
        _row("train step deeper", (32, 1, 128, 128), "channels_last", 1, 1.0, 2.0),  # not a pool row
    ]
    table = bench_lib.dispatch_table(rows)
    assert table == {
        "cpu/channels_last/float32/k2x2s2x2p0x0/C16/64x64/batch/fwd": True,
        "cpu/channels_last/float32/k2x2s2x2p0x0/C16/64x64/batch/fwd+bwd": False,
        "cpu/nchw/float32/k2x2s2x2p0x0/C8/16x16/N1/fwd": False,
        "cpu/nchw/float32/k2x2s2x2p0x0/C8/16x16/N1/relu+fwd+bwd": True,
        "cpu/channels_last/float32/relu_/C16/64x64/batch/fwd+bwd": False,
        "cpu/nchw/float32/relu_/C16/64x64/batch/fwd+bwd": True,
    }
    namespace: dict = {}
    exec(bench_lib.dispatch_module_text(table, "xraydeconv bench --suite"), namespace)
    assert namespace["TABLE"] == table


def test_cli_suite_writes_json_and_the_dispatch_table(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_lib, "SUITE_SIZES", (16,))
    monkeypatch.setattr(bench_lib, "SUITE_BATCHES", (2,))
    monkeypatch.setattr(bench_lib, "TRAIN_PX", 16)
    monkeypatch.setattr(bench_lib, "TRAIN_BATCH", 2)
    # the command loads the table it measured into the running process: give it a copy to overwrite, with a
    # CUDA class that a CPU run keeps and a stale CPU class that it drops
    cuda_key = "cuda/nchw/float32/k2x2s2x2p0x0/C8/8x8/batch/fwd"
    stale = "cpu/nchw/float32/k2x2s2x2p0x0/C3/5x5/batch/fwd"
    monkeypatch.setattr(pool_dispatch, "TABLE", {**pool_dispatch.TABLE, cuda_key: True, stale: True})
    out, table = tmp_path / "suite.json", tmp_path / "table.py"
    args = ["--suite", "--threads", "1", "--repeats", "1", "--json", str(out), "--write-dispatch", str(table)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    assert "train step deeper-aug" in result.output and "pool fwd+bwd" in result.output
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] == [1] and data["repeats"] == 1
    table_rows = [r for r in data["rows"] if not r["what"].startswith("train step")]
    assert {r["what"] for r in table_rows} >= {"pool fwd", "relu_ fwd+bwd", "bn+relu fwd+bwd", "bn+relu+pool fwd+bwd"}
    namespace: dict = {}
    exec(table.read_text(), namespace)
    assert namespace["TABLE"].pop(cuda_key) is True and stale not in namespace["TABLE"]
    assert len(namespace["TABLE"]) == len(table_rows)  # one thread count: one row per shape class
    ops_of = {"relu_ fwd+bwd": "relu_", "bn+relu fwd+bwd": "bn_relu", "bn+relu+pool fwd+bwd": "bn_relu_pool"}
    for r in table_rows:
        op, passes = (ops_of[r["what"]], "fwd+bwd") if r["what"] in ops_of else ("k2x2s2x2p0x0", r["what"][5:])
        key = f"cpu/{r['layout']}/float32/{op}/C{r['shape'][1]}/{r['shape'][2]}x{r['shape'][3]}/batch/{passes}"
        assert namespace["TABLE"][key] == (r["speedup"] >= 1.0)


def test_cli_suite_passes_measure_only_those_and_keep_the_other_table_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_lib, "SUITE_SIZES", (16,))
    monkeypatch.setattr(bench_lib, "SUITE_BATCHES", (2,))
    # a pool class the BatchNorm passes do not measure stays as it was, even one of this device
    pool_key = "cpu/nchw/float32/k2x2s2x2p0x0/C3/5x5/batch/fwd"
    monkeypatch.setattr(pool_dispatch, "TABLE", {**pool_dispatch.TABLE, pool_key: False})
    before = dict(pool_dispatch.TABLE)
    out, table = tmp_path / "suite.json", tmp_path / "table.py"
    args = ["--suite", "--threads", "1", "--repeats", "1", "--passes", "bn+relu fwd+bwd, bn+relu+pool fwd+bwd",
            "--json", str(out), "--write-dispatch", str(table)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert {r["what"] for r in rows} == {"bn+relu fwd+bwd", "bn+relu+pool fwd+bwd"}
    namespace: dict = {}
    exec(table.read_text(), namespace)
    measured = {k for k in namespace["TABLE"] if "/bn_relu" in k and k not in before}
    assert namespace["TABLE"][pool_key] is False and len(measured) == len(rows)
    assert {k: v for k, v in namespace["TABLE"].items() if k not in measured and "/bn_relu" not in k} == {
        k: v for k, v in before.items() if "/bn_relu" not in k}


def test_cli_suite_rejects_an_unknown_pass():
    result = CliRunner().invoke(bench, ["--suite", "--passes", "pool fwd,conv"])
    assert result.exit_code == 2 and "conv is not a suite pass" in result.output
    result = CliRunner().invoke(bench, ["--suite", "--passes", "conv,gemm"])
    assert result.exit_code == 2 and "not suite passes: conv, gemm" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--write-dispatch", "t.py"], "comes from --suite"),
        (["--passes", "pool fwd"], "add --suite"),
        (["--suite", "--device", "cuda", "--passes", "pool fwd,bn+relu fwd+bwd"], "CPU kernels"),
    ],
)
def test_cli_suite_option_errors(args, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "has_kernels", lambda device="cpu": True)
    result = CliRunner().invoke(bench, args)
    assert isinstance(result.exception, UserError) and message in str(result.exception)


def test_time_samples_runs_fast_functions_in_batches():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.003:
            pass

    samples = bench_lib.time_samples({"fast": fast, "slow": slow}, repeats=2, min_sample_ms=2.0)
    assert calls["slow"] == 2 + 2  # 3 ms per call: one call per sample
    assert calls["fast"] > 2 + 2 * 100  # microseconds per call: runs of many calls per sample
    assert all(len(v) == 2 for v in samples.values()) and min(samples["slow"]) >= 3.0 > max(samples["fast"])


def test_cli_refuses_thread_counts_that_would_crash_openmp():
    result = CliRunner().invoke(bench, ["--quick", "--threads", "1,100000"])
    assert isinstance(result.exception, UserError)
    assert str(result.exception).startswith("--threads 100000: must be between 1 and 4 per core")
