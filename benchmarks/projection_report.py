"""Ratio report for the top-n projection: xraydeconv DeconvNet vs Captum vs a plain-PyTorch Zeiler & Fergus.

    OMP_WAIT_POLICY=passive python benchmarks/projection_report.py [--device cpu|cuda] [--batch 1] [--top-n 25]

Contenders, run interleaved in the same process (medians over --repeat rounds, ratios to ours):

* ``xraydeconv``: ``DeconvNet(model).project(x, top_n)``.
* ``captum``: ``NeuronDeconvolution(model, relu).attribute(...)`` once per filter, as a user would write it.
* ``plain``: the best plain-PyTorch deconvnet we could write: one shared forward recording the max-pool indices,
  then all top-n projections as one batch through ``F.max_unpool2d`` + ``conv_transpose2d`` (BatchNorm folded).

The net is ``xraydeconv.training.models.build("deeper")`` with random weights (the timing does not depend on training),
or with ``--model resnet18`` torchvision's ResNet-18 layout (3 input channels, 224 px, projected through its graph
from ``layer4``); its "plain" contender is the batched autograd deconvnet (each image repeated once per filter,
the ReLU modules' backward replaced by rectification, one backward pass).
Peak memory: the increase of the peak resident set (VmHWM) over the model's setup on CPU, measured in a child
process per contender so that one contender's peak does not hide another's; ``torch.cuda.max_memory_allocated``
on CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch is imported: spin-waiting distorts timings

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from xraydeconv.explain.deconvnet import DeconvNet  # noqa: E402
from xraydeconv.training.models import BasicBlock, build  # noqa: E402


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (widths 64-128-256-512, two BasicBlocks per stage), 3 input channels."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, w in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18() if name == "resnet18" else build(name, num_classes=24, in_channels=1, input_size=256)
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval().to(device)


def _relu_of_last_conv(features: nn.Sequential) -> nn.Module:
    last = None
    seen_conv = False
    for m in features:
        if isinstance(m, nn.Conv2d):
            seen_conv = True
        elif isinstance(m, nn.ReLU) and seen_conv:
            last = m
    return last


def plain_zf(features: nn.Sequential, x: torch.Tensor, top_n: int) -> torch.Tensor:
    """Plain-PyTorch deconvnet from the last conv's ReLU: shared forward, batched unpool + conv_transpose2d."""
    mods = list(features)
    start = max(i for i, m in enumerate(mods) if isinstance(m, nn.ReLU))
    rec, h = {}, x
    with torch.no_grad():
        for i, m in enumerate(mods[: start + 1]):
            if isinstance(m, nn.Conv2d):
                rec[i] = h.shape[-2:]
                h = m(h)
            elif isinstance(m, nn.BatchNorm2d):
                h = F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            elif isinstance(m, nn.ReLU):
                h = F.relu(h)
            elif hasattr(m, "kernel_size"):  # MaxPool2d / SwitchMaxPool2d
                rec[i] = (h.shape[-2:], m.kernel_size, m.stride)
                h, rec[(i, "idx")] = F.max_pool2d(h, m.kernel_size, m.stride, return_indices=True)
        B, C = h.shape[:2]
        score, chans = h.flatten(2).amax(2).topk(top_n, dim=1)
        g = torch.zeros(B, top_n, *h.shape[1:], device=x.device, dtype=x.dtype)
        sel = torch.arange(top_n, device=x.device)
        for b in range(B):
            g[b, sel, chans[b]] = h[b, chans[b]]
        g = g.flatten(0, 1)
        for i in range(start, -1, -1):
            m = mods[i]
            if isinstance(m, nn.Conv2d):
                w = m.weight
                if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
                    bn = mods[i + 1]
                    w = w * (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)
                g = F.conv_transpose2d(g, w, None, m.stride, m.padding)
            elif isinstance(m, nn.ReLU) and i != start:
                g = F.relu(g)
            elif hasattr(m, "kernel_size") and not isinstance(m, nn.Conv2d):
                size, k, s = rec[i]
                idx = rec[(i, "idx")].repeat_interleave(top_n, 0)
                g = F.max_unpool2d(g, idx, k, s, output_size=size)
        return g.view(B, top_n, *g.shape[1:])


class _DeconvReLU(torch.autograd.Function):
    """ReLU forward, deconvnet backward: the signal is rectified, not masked by the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.clamp(min=0)


def plain_autograd(model: nn.Module, layer: nn.Module, x: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch batched deconvnet for any model: each image repeated top_n times in one batch, every ReLU
    module's output swapped (forward hook) for a deconvnet ReLU, one backward from ``layer``'s output."""
    B, n = chans.shape
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    inplace = [m.inplace for m in relus]
    store = {}
    hooks = [m.register_forward_hook(lambda m, i, o: _DeconvReLU.apply(i[0])) for m in relus]
    hooks.append(layer.register_forward_hook(lambda m, i, o: store.__setitem__("o", o)))
    try:
        for m in relus:  # the hook replaces the output: the input must still be the pre-ReLU values
            m.inplace = False
        xs = x.repeat_interleave(n, 0).requires_grad_(True)
        with torch.enable_grad():
            model(xs)
            o = store["o"][torch.arange(B * n, device=x.device), chans.reshape(-1)]
            (g,) = torch.autograd.grad((o * o.detach()).sum(), xs)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in zip(relus, inplace, strict=True):
            m.inplace = flag
    return g.view(B, n, *g.shape[1:])


def captum_zf(model: nn.Module, relu: nn.Module, x: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    from captum.attr import NeuronDeconvolution

    out = []
    for b in range(x.shape[0]):
        for c in chans[b].tolist():
            attr = NeuronDeconvolution(model, relu)
            out.append(
                attr.attribute(x[b : b + 1], neuron_selector=lambda o, c=c: (o[:, c] * o[:, c].detach()).sum((1, 2)))
            )
    return torch.cat(out)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_runners(args, model, x):
    if args.model == "resnet18":
        return _graph_runners(args, model, x)
    dn = DeconvNet(model)
    relu = _relu_of_last_conv(model.features)
    # the filters Captum is asked for: the top-n of the last conv's ReLU (a cheap forward, no projection)
    upto = max(i for i, m in enumerate(model.features) if m is relu)
    with torch.no_grad():
        act = model.features[: upto + 1](x)
    chans = act.flatten(2).amax(2).topk(args.top_n, dim=1).indices
    runners = {
        "xraydeconv": lambda: dn.project(x, top_n=args.top_n, precision=args.precision),
        "plain": lambda: plain_zf(model.features, x, args.top_n),
        "captum": lambda: captum_zf(model, relu, x, chans),
    }
    return _with_variants(runners, args, model, dn, x)


def _graph_runners(args, model, x):
    """The ResNet-18: projected through its graph from ``layer4`` (the default layer); "plain" is the batched
    autograd deconvnet, Captum is called once per filter of the same layer."""
    dn = DeconvNet(model)
    act = {}
    hook = model.layer4.register_forward_hook(lambda m, i, o: act.__setitem__("o", o))
    with torch.no_grad():
        model(x)
    hook.remove()
    chans = act["o"].flatten(2).amax(2).topk(args.top_n, dim=1).indices
    runners = {
        "xraydeconv": lambda: dn.project(x, top_n=args.top_n, precision=args.precision),
        "plain": lambda: plain_autograd(model, model.layer4, x, chans),
        "captum": lambda: captum_zf(model, model.layer4, x, chans),
    }
    return _with_variants(runners, args, model, dn, x)


def _with_variants(runners: dict, args, model, dn, x) -> dict:
    """Add the fp32 run beside a bf16 one, and the dense path with --dense."""
    if args.precision != "fp32":
        runners["xraydeconv-fp32"] = lambda: dn.project(x, top_n=args.top_n)
    if args.dense:
        dense = DeconvNet(model, sparse=False)
        runners["xraydeconv-dense"] = lambda: dense.project(x, top_n=args.top_n, precision=args.precision)
    return runners


def _peak_rss_kib() -> int:
    """Peak resident set of this process in KiB. VmHWM rather than ru_maxrss: Linux carries ru_maxrss over
    exec, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _peak_child(args, name: str) -> float:
    """Peak RSS increase (MiB) of one contender, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--peak-of", name, "--device", args.device, "--batch", str(args.batch),
           "--top-n", str(args.top_n), "--precision", args.precision]
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model]
    cmd += ["--size", str(args.size)]
    cmd += ["--image", args.image] if args.image else []
    cmd += ["--dense"] if args.dense else []
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1, help="images per call (data-set throughput with batching)")
    ap.add_argument("--top-n", type=int, default=25)
    ap.add_argument("--size", type=int, default=None, help="input side (default: the checkpoint's, else 256)")
    ap.add_argument("--model", default="deeper", help="deeper, shallow or resnet18 (torchvision's layout, 3 channels)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="xraydeconv's projection dtype")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--dense", action="store_true", help="also time DeconvNet(model, sparse=False)")
    ap.add_argument("--checkpoint", help="a trained checkpoint instead of random weights (its model, its input size)")
    ap.add_argument("--image", help="an image file instead of uniform noise (preprocessed like the data sets)")
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="time with the wall clock, or with this process's CPU time (time.process_time): with "
                         "--threads 1 on a shared machine, the CPU time is not inflated by other jobs' time slices")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.checkpoint:
        from xraydeconv.training.checkpoint import load_checkpoint

        ck = load_checkpoint(args.checkpoint, map_location=args.device)
        model, args.model, args.size = ck.model, f"{ck.model_name} ({args.checkpoint})", args.size or ck.input_size
    else:
        model = build_model(args.model, args.device)
        args.size = args.size or (224 if args.model == "resnet18" else 256)
    if args.image:
        from xraydeconv.data import load_image

        x = load_image(args.image, args.size)[None].repeat(args.batch, 1, 1, 1).to(args.device)
    else:
        channels = 3 if args.model == "resnet18" else 1
        x = torch.rand(args.batch, channels, args.size, args.size, device=args.device)

    if args.peak_of:  # child: one contender, report its peak memory increase
        runners = make_runners(args, model, x)
        base = _peak_rss_kib()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated()
        runners[args.peak_of]()
        _sync(args.device)
        if args.device == "cuda":
            print((torch.cuda.max_memory_allocated() - base_cuda) / 2**20)
        else:
            print((_peak_rss_kib() - base) / 1024)
        return

    runners = make_runners(args, model, x)
    if args.skip_captum:
        runners.pop("captum")
    # agreement first: the contenders compute the same maps
    ours = runners["xraydeconv"]().maps if args.precision == "fp32" else None
    if ours is not None:
        ref = runners["plain"]()
        err = ((ours - ref).norm() / ref.norm()).item()
        print(f"plain vs xraydeconv rel. error: {err:.2e}")
    times: dict[str, list[float]] = {k: [] for k in runners}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for fn in runners.values():  # warm-up
        fn()
    for _ in range(args.repeat):
        for name, fn in runners.items():  # interleaved: each round runs every contender once
            _sync(args.device)
            t0 = clock()
            fn()
            _sync(args.device)
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    peaks = {k: _peak_child(args, k) for k in runners}

    dev = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    print(f"# top-{args.top_n} projection, {args.model} net, {'x'.join(map(str, x.shape))}, {args.device} "
          f"({dev}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, median of {args.repeat}, {args.clock} clock, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'contender':<16} {'median s':>10} {'images/s':>10} {'vs ours':>9} {'peak MiB':>9}")
    for k in runners:
        print(f"{k:<16} {med[k]:>10.4f} {args.batch / med[k]:>10.2f} {med[k] / med['xraydeconv']:>8.2f}x "
              f"{peaks[k]:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_s": med, "peak_mib": peaks, "times": times}, f, indent=1)


if __name__ == "__main__":
    main()
