"""``xraydeconv bench``: the kernel vs native ratio table for the switch-pooling ops."""

from __future__ import annotations

import json
import os
from pathlib import Path

# OpenMP threads that spin while waiting distort timings on shared machines; must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import click  # noqa: E402


def _threads(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected thread counts like 1,2 — got {value!r}") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"thread counts must be positive integers, got {value!r}")
    from xraydeconv.device import check_threads

    return [check_threads(n) for n in counts]


def _passes(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    from xraydeconv.reports.bench import SUITE_PASSES

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in SUITE_PASSES] or ([] if names else [repr(value)])
    if unknown:
        what = f"{unknown[0]} is not a suite pass" if len(unknown) == 1 else f"not suite passes: {', '.join(unknown)}"
        raise click.BadParameter(f"{what}; use some of: " + ", ".join(SUITE_PASSES))
    return names


def _file_option(flag: str, dest: str, help_text: str):
    """A click option naming a file to write."""
    return click.option(flag, dest, type=click.Path(dir_okay=False, path_type=Path), help=help_text)


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where to run. CUDA timings use CUDA events and synchronise around every call.",
)
@click.option(
    "--threads",
    callback=_threads,
    metavar="N[,N...]",
    help="CPU thread counts to measure at, e.g. 1,2 (torch.set_num_threads). Default: torch's current count.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    help="Timed rounds per row (median kept). [default: 15; 7 with --suite; 5 with --quick]",
)
@click.option("--quick", is_flag=True, help="Smaller shapes and 5 rounds: a first look in seconds.")
@click.option(
    "--suite",
    is_flag=True,
    help="Instead of the op table: every pool layer shape of the nets (128 and 256 px, batch 1 and 32, both layouts, "
    "fwd and fwd+bwd, alone and fused with a ReLU) and each net's channels-last training step, kernel vs native, "
    "on --device.",
)
@click.option(
    "--passes",
    callback=_passes,
    metavar="PASS[,PASS...]",
    help="With --suite: measure only these passes, e.g. 'bn+relu fwd+bwd,bn+relu+pool fwd+bwd' or 'train step' "
    "(all by default); --write-dispatch then adds or overwrites only the classes those rows measure.",
)
@_file_option(
    "--write-dispatch",
    "dispatch_path",
    "With --suite: write the auto dispatch table derived from the pool rows to this Python file "
    "(xraydeconv/ops/pool_dispatch_table.py is the one SwitchMaxPool2d reads).",
)
@_file_option("--json", "json_path", "Also write every row (and the machine description) to this JSON file.")
def bench(
    device: str,
    threads: list[int] | None,
    repeats: int | None,
    quick: bool,
    suite: bool,
    passes: list[str] | None,
    dispatch_path: Path | None,
    json_path: Path | None,
) -> None:
    """Time the switch-pooling kernels against PyTorch's own max pooling and print the ratios.

    For 2x2/s2 float32 max pooling on the shapes (32,64,128,128), (8,256,32,32) and (1,64,256,256),
    in NCHW and channels_last, the table compares:

    \b
      pool          switch_pool2d      vs F.max_pool2d(..., return_indices=True)
      pool out=     switch_pool2d_out  vs max_pool2d_with_indices.out (no allocation)
      pool fwd+bwd  forward + gradient with switches vs with native indices
      pool bwd      switch_unpool2d    vs max_pool2d_with_indices_backward
      unpool        switch_unpool2d    vs F.max_unpool2d
      unpool out=   switch_unpool2d_out vs max_unpool2d.out (no allocation)

    Kernel, native and a copy_ of the same number of bytes run interleaved in this one process and
    the median of --repeats rounds is printed, with GB/s, the speed-up (native / kernel), the
    kernel's bandwidth as a fraction of copy_, and the memory taken by uint8 switches vs int64
    indices. The allocating rows include the page faults of fresh outputs; the "out=" rows time the
    kernels alone. The header names the CPU (and GPU), the instruction set the kernels use and the
    torch version. OMP_WAIT_POLICY defaults to passive for this command.

    With --suite it measures instead what the nets run, on --device: every pool layer input of
    shallow, deeper and deeper-aug at 128 and 256 px (128 only with --quick), batch 1 and 32, NCHW
    and channels-last, forward and forward+backward, each alone ("pool fwd") and with the ReLU in
    front fused ("pool relu+fwd": switch_relu_pool2d vs relu_ then max_pool2d); every input of a
    ReLU not followed by a pool, forward+backward ("relu_ fwd+bwd": xraydeconv.ops.relu_, which
    masks the gradient in place, vs torch.relu_); on the CPU every BatchNorm input, channels-last,
    forward+backward ("bn+relu fwd+bwd", "bn+relu+pool fwd+bwd": batch_norm_relu and
    batch_norm_relu_pool2d vs F.batch_norm, torch.relu_ and F.max_pool2d); then each net's training
    step ("train step": 128 px, batch 32, channels-last, AdamW) with the kernels, with auto and
    with native pooling. --passes picks some of these. Speed-ups are medians over the interleaved
    rounds of the per-round ratio. --write-dispatch turns the pool, ReLU and BatchNorm rows into the
    table that SwitchMaxPool2d(backend="auto") and FusedSequential follow.

    \b
    Examples:
      xraydeconv bench --threads 1,2
      xraydeconv bench --quick --json bench.json
      xraydeconv bench --device cuda
      xraydeconv bench --suite --threads 1,2 --json suite.json \\
          --write-dispatch xraydeconv/ops/pool_dispatch_table.py
      xraydeconv bench --suite --threads 1,2 --passes 'bn+relu fwd+bwd,bn+relu+pool fwd+bwd'
    """
    _check_arguments(device, suite, json_path, dispatch_path)
    _check_passes(device, suite, passes)
    rounds = repeats if repeats is not None else (5 if quick else (7 if suite else 15))
    if suite:
        text, data, table = _run_suite(device, threads, rounds, quick, dispatch_path is not None, passes)
    else:
        text, data, table = _run_table(device, threads, rounds, quick)
    click.echo(text)
    _write_outputs(data, table, threads, json_path, dispatch_path)


def _check_arguments(device: str, suite: bool, json_path: Path | None, dispatch_path: Path | None) -> None:
    """Refuse what cannot run or be written before any timing starts."""
    import torch

    from xraydeconv import ops
    from xraydeconv.errors import UserError
    from xraydeconv.io import check_output_file

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if not ops.has_kernels(device):
        raise UserError(
            f"--device {device}: xraydeconv._C has no {device} kernels; build them with "
            "`pip install --no-build-isolation -e .` (CUDA needs nvcc at build time)"
        )
    for path in (json_path, dispatch_path):
        if path is not None:
            check_output_file(path)
    if dispatch_path is not None and not suite:
        raise UserError(f"--write-dispatch {dispatch_path}: the dispatch table comes from --suite; add it")


def _check_passes(device: str, suite: bool, passes: list[str] | None) -> None:
    from xraydeconv.errors import UserError
    from xraydeconv.reports.bench import BN_PASSES

    if passes is None:
        return
    if not suite:
        raise UserError(f"--passes {','.join(passes)}: passes are the suite's; add --suite")
    cpu_only = [p for p in passes if p in BN_PASSES.values()]
    if device != "cpu" and cpu_only:
        raise UserError(f"--passes {','.join(cpu_only)}: the BatchNorm ops are CPU kernels; drop it or use "
                        "--device cpu")


def _write_outputs(data: dict, table: dict, threads: list[int] | None, json_path: Path | None,
                   dispatch_path: Path | None) -> None:
    from xraydeconv.io import write_atomically

    if json_path is not None:
        write_atomically(json_path, lambda f: json.dump(data, f, indent=2), mode="w", encoding="utf-8")
        click.echo(f"wrote {json_path}")
    if dispatch_path is not None:
        from xraydeconv.reports.bench import dispatch_module_text

        command = "xraydeconv bench --suite" + (f" --threads {','.join(map(str, threads))}" if threads else "")
        text = dispatch_module_text(table, f"{command} --write-dispatch xraydeconv/ops/pool_dispatch_table.py")
        write_atomically(dispatch_path, lambda f: f.write(text), mode="w", encoding="utf-8")
        click.echo(f"wrote {dispatch_path} ({sum(table.values())} of {len(table)} shape classes use the kernels)")


def _progress_bar():
    from tqdm import tqdm

    bar = tqdm(desc="bench", unit="row", leave=False)

    def progress(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    return bar, progress


def _run_table(device: str, threads, rounds: int, quick: bool):
    from xraydeconv.reports.bench import format_report, run_report

    bar, progress = _progress_bar()
    try:
        report = run_report(device=device, threads=threads, repeats=rounds, quick=quick, progress=progress)
    finally:
        bar.close()
    return format_report(report), report.as_dict(), {}


def _run_suite(device: str, threads, rounds: int, quick: bool, use_table: bool, passes: list[str] | None):
    from xraydeconv.ops import pool_dispatch
    from xraydeconv.reports import bench as lib

    sizes = lib.SUITE_SIZES[:1] if quick else lib.SUITE_SIZES
    bar, progress = _progress_bar()
    try:
        rows = lib.run_pool_suite(threads, rounds, sizes, lib.SUITE_BATCHES, progress=progress, device=device,
                                  passes=passes)
        # the other devices' measurements stay in the table, and with --passes the other passes' rows
        table = {k: v for k, v in pool_dispatch.TABLE.items() if passes is not None or not k.startswith(f"{device}/")}
        table.update(lib.dispatch_table(rows, device))
        table = dict(sorted(table.items()))
        if use_table:  # the training steps' auto side runs on the table just measured
            pool_dispatch.TABLE.clear()
            pool_dispatch.TABLE.update(table)
        if passes is None or lib.TRAIN_PASS in passes:
            rows += lib.run_train_steps(threads=threads, repeats=rounds, progress=progress, device=device)
    finally:
        bar.close()
    machine = lib.machine_info(device)
    machine["threads"] = sorted({r.threads for r in rows})
    data = {"machine": machine, "repeats": rounds, "rows": [r.as_dict() for r in rows]}
    return lib.format_suite(rows, machine, rounds), data, table
