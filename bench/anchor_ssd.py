"""Public anchors for bench/ssd_bench.cc and bench/conv1d_bench.cc, timed on the same card in the
same device call.

SSD: mamba_ssm's Triton `mamba_chunk_scan_combined` (github:state-spaces/mamba, the
mamba_ssm/ops/triton/ssd_*.py files and their small imports copied into
.gpu-ssd/anchor/mamba_ssm/ with empty __init__.py files, so no CUDA extension is built), called
as the Mamba2 module calls it: chunk 256, D skip, dt_bias, dt_softplus=True, no initial states.
Same shapes and dtypes as ours: x, B, C bf16; dt, A, D, dt_bias fp32.

conv1d: torch depthwise Conv1d(groups=C, padding=K-1) + SiLU on the channels-last [B, S, C]
tensor, exactly the Mamba2 module's fallback expression
`act(conv1d(xBC.transpose(1, 2))[..., :S].transpose(1, 2))`. It is NOT the causal_conv1d CUDA
package (not installed on the device machine).

Timing: triton.testing.do_bench, median, which clears a 256 MB L2-flush buffer before every run
(our bench does the same with a 256 MiB memset).

    python3 bench/anchor_ssd.py [--anchor-dir .gpu-ssd/anchor]
    python3 bench/anchor_ssd.py --anchor-dir DIR --rounds 5 \
        --alternate "ours=./bin/ssd_bench --default_only" "before=./prev/ssd_bench --only=15"

--alternate: SSD fwd+bwd only, taken alternately in one process: per round the anchor at both
shapes, then each command (an ssd_bench; its "[v3 all]" fwd+bwd lines are read), so each ratio
compares timings seconds apart (the card's clock and the anchor's time moved 3.7-4.9 ms between
single timings in sessions 5-6). Prints each round and, per shape and command, the medians and
the median, min and max of the per-round ratios command / anchor. --warm-only: compile and
autotune once (fills Triton's on-disk cache), no timing.
"""
import argparse
import re
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton


def ssd_anchor(batch, seq, heads=64, headdim=64, dstate=128, groups=1, chunk=256,
               fwd_bwd_only=False):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, seq, heads, headdim, device=dev, dtype=torch.bfloat16, generator=g)
    dt = torch.randn(batch, seq, heads, device=dev, dtype=torch.float32, generator=g)
    a = -torch.exp(1.4 + 0.6 * torch.randn(heads, device=dev, generator=g))
    dt_bias = -3.0 + 0.5 * torch.randn(heads, device=dev, generator=g)
    bm = torch.randn(batch, seq, groups, dstate, device=dev, dtype=torch.bfloat16, generator=g)
    cm = torch.randn(batch, seq, groups, dstate, device=dev, dtype=torch.bfloat16, generator=g)
    d = 1.0 + 0.2 * torch.randn(heads, device=dev, generator=g)
    dy = torch.randn(batch, seq, heads, headdim, device=dev, dtype=torch.bfloat16, generator=g)
    leaves = [x, dt, a, dt_bias, bm, cm, d]
    for t in leaves:
        t.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return mamba_chunk_scan_combined(x, dt, a, bm, cm, chunk, D=d, dt_bias=dt_bias,
                                             dt_softplus=True)

    def fwd_bwd():
        y = mamba_chunk_scan_combined(x, dt, a, bm, cm, chunk, D=d, dt_bias=dt_bias,
                                      dt_softplus=True)
        y.backward(dy)

    fwd_bwd()  # compile / autotune
    torch.cuda.synchronize()

    def time_fwd_bwd():
        return triton.testing.do_bench(fwd_bwd, warmup=50, rep=300, grad_to_none=leaves,
                                       return_mode="median")

    def fwd_bwd_fresh():
        for t in leaves:
            t.grad = None
        fwd_bwd()

    if fwd_bwd_only:
        return time_fwd_bwd, fwd_bwd_fresh
    t_f = triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median")
    return t_f, time_fwd_bwd()


OURS_LINE = re.compile(r"^ssd\[v3 all\]\s+fwd\+bwd\s+B(\d+) S(\d+) .*?([\d.]+) ms")


def kernel_ms(fn, calls=10, top=12):
    """GPU time of the kernels (and memsets) one call of fn launches, summed (torch.profiler):
    what do_bench's wall time between events would be without launch gaps on the host side.
    Also returns the `top` largest entries as (ms per call, launches per call, name)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        total_us += us
        if us > 0:
            rows.append((us / calls / 1e3, e.count / calls, e.key))
    rows.sort(reverse=True)
    return total_us / calls / 1e3, rows[:top]


def alternate(commands, rounds):
    shapes = [(8, 2048), (2, 8192)]
    made = {shape: ssd_anchor(*shape, fwd_bwd_only=True) for shape in shapes}
    timers = {shape: made[shape][0] for shape in shapes}
    named = [c.split("=", 1) for c in commands]
    times = {(name, shape): [] for name in ["anchor"] + [n for n, _ in named] for shape in shapes}
    for r in range(rounds):
        for shape in shapes:
            times[("anchor", shape)].append(timers[shape]())
        for name, cmd in named:
            out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
            got = {}
            for line in out.stdout.splitlines():
                m = OURS_LINE.match(line)
                if m:
                    got.setdefault((int(m.group(1)), int(m.group(2))), float(m.group(3)))
            for shape in shapes:
                times[(name, shape)].append(got.get(shape, float("nan")))
        print(f"round {r}: " + "  ".join(
            f"{name} B{b} S{s} {times[(name, (b, s))][-1]:.3f}"
            for name in ["anchor"] + [n for n, _ in named] for b, s in shapes), flush=True)
    for shape in shapes:
        b, s = shape
        anchor = times[("anchor", shape)]
        print(f"alternating anchor B{b} S{s} fwd+bwd: median {statistics.median(anchor):.3f} ms "
              f"(min {min(anchor):.3f} max {max(anchor):.3f}, {rounds} rounds)")
        for name, _ in named:
            t = times[(name, shape)]
            ratios = [x / a for x, a in zip(t, anchor)]
            print(f"alternating {name} B{b} S{s} fwd+bwd: median {statistics.median(t):.3f} ms; "
                  f"/ anchor: median {statistics.median(ratios):.3f} (min {min(ratios):.3f} "
                  f"max {max(ratios):.3f})", flush=True)
    for shape in shapes:
        try:
            total, rows = kernel_ms(made[shape][1])
            print(f"anchor kernel sum B{shape[0]} S{shape[1]} fwd+bwd: "
                  f"{total:.3f} ms per call (torch.profiler, 10 calls)", flush=True)
            for ms, n, name in rows:
                print(f"anchor kernel B{shape[0]} S{shape[1]}: {ms:7.3f} ms x{n:g} {name[:90]}",
                      flush=True)
        except Exception as e:  # diagnostic only
            print(f"anchor kernel sum failed: {e!r}", flush=True)


def conv_anchor(batch, seq, channels=4352, width=4):
    dev = "cuda"
    conv = torch.nn.Conv1d(channels, channels, width, groups=channels, padding=width - 1,
                           bias=True, device=dev, dtype=torch.bfloat16)
    x = torch.randn(batch, seq, channels, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(batch, seq, channels, device=dev, dtype=torch.bfloat16)

    def f():
        return F.silu(conv(x.transpose(1, 2))[..., :seq].transpose(1, 2))

    def fwd():
        with torch.no_grad():
            return f()

    def fwd_bwd():
        f().backward(dy)

    fwd_bwd()
    torch.cuda.synchronize()
    t_f = triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median")
    t_fb = triton.testing.do_bench(fwd_bwd, warmup=50, rep=300,
                                   grad_to_none=[x] + list(conv.parameters()),
                                   return_mode="median")
    return t_f, t_fb


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--anchor-dir", default=".gpu-ssd/anchor")
    p.add_argument("--alternate", nargs="*", default=None, metavar="NAME=COMMAND")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warm-only", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, args.anchor_dir)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}")
    if args.warm_only:
        for b, s in [(8, 2048), (2, 8192)]:
            ssd_anchor(b, s, fwd_bwd_only=True)
        print("anchor warm-up done", flush=True)
        return
    if args.alternate is not None:
        alternate(args.alternate, args.rounds)
        return
    for b, s in [(8, 2048), (2, 8192)]:
        t_f, t_fb = ssd_anchor(b, s)
        print(f"anchor mamba_chunk_scan_combined B{b} S{s} H64 P64 N128 G1 Q256: "
              f"fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms", flush=True)
    for b, s in [(8, 2048), (2, 8192)]:
        t_f, t_fb = conv_anchor(b, s)
        print(f"anchor torch conv1d+silu B{b} S{s} C4352 K4: fwd {t_f:.3f} ms  "
              f"fwd+bwd {t_fb:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
