"""The ratio report behind ``xraydeconv bench``, on tiny shapes so that it runs in a second."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from xraydeconv import ops
from xraydeconv.cli.bench import bench
from xraydeconv.errors import UserError
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
    assert isinstance(result.exception, UserError) and "does not exist" in str(result.exception)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cli_without_a_gpu():
    result = CliRunner().invoke(bench, ["--device", "cuda"])
    assert isinstance(result.exception, UserError) and "no CUDA device" in str(result.exception)
