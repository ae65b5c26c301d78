#!/usr/bin/env python3
"""Public anchor for bench/slstm_bench.cc: the official xLSTM sLSTM CUDA kernel (NX-AI/xlstm,
xlstm/blocks/slstm/src/cuda), JIT-built through its own loader (torch.utils.cpp_extension), timed
at the same shapes in bf16 (PERFORMANCE.md's anchor: B8 S2048 d2048 NH4, and d768 NH4).

The anchor's sources are never committed: copy them next to this script's --xlstm-dir, e.g.
    git archive HEAD xlstm/blocks/slstm xlstm/components/{__init__,util,init}.py \
        xlstm/blocks/__init__.py | tar -x -C .gpu-slstm/anchor
    : > .gpu-slstm/anchor/xlstm/__init__.py   # the package root imports mLSTM backends we skip
Two things are patched at run time, not in the sources: nvcc 13 needs
-static-global-template-stub=false for the extension's templated kernels, and the loader's random
sleep (up to 10 s, against concurrent builds) is skipped.

Timed: cell(x) (training mode; x [B, S, 4d] bf16, gates precomputed, zero initial state) and
cell(x) + backward of the output with a random gradient. CUDA events, warm-up, median of --reps.

    python3 anchor_slstm.py --xlstm-dir DIR --config 1.3b-b8 [--config 125m-b16 ...] [--build-only]
"""
import argparse
import math
import os
import statistics
import sys
import time

CONFIGS = {  # name: (batch, seq_len, hidden, heads)
    "1.3b-b8": (8, 2048, 2048, 4),
    "125m-b8": (8, 2048, 768, 4),
    "125m-b16": (16, 2048, 768, 4),
}


_PATCHED = False


def make_cell(xlstm_dir, batch, hidden, heads):
    global _PATCHED
    if xlstm_dir not in sys.path:
        sys.path.insert(0, xlstm_dir)
    import torch
    from xlstm.blocks.slstm.src import cuda_init

    orig_load = cuda_init._load
    if _PATCHED:
        orig_load = None

    def load_with_flags(name, sources, **kwargs):
        flags = list(kwargs.get("extra_cuda_cflags", []))
        flags.append("-static-global-template-stub=false")
        kwargs["extra_cuda_cflags"] = flags
        return orig_load(name, sources, **kwargs)

    if not _PATCHED:
        cuda_init._load = load_with_flags
        _PATCHED = True
    cuda_init.time = type("NoSleep", (), {"sleep": staticmethod(lambda s: None)})
    from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig

    cfg = sLSTMCellConfig(hidden_size=hidden, num_heads=heads, backend="cuda",
                          batch_size=batch, dtype="bfloat16",
                          recurrent_weight_init="standard")
    t0 = time.time()
    cell = sLSTMCell(cfg).cuda()
    print(f"anchor build/load {time.time() - t0:.1f} s", flush=True)
    with torch.no_grad():  # not zeros: a random recurrent matrix at the usual scale
        cell._recurrent_kernel_.normal_(0.0, 1.0 / math.sqrt(hidden // heads))
    return torch, cell


def time_ms(torch, fn, reps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xlstm-dir", required=True)
    ap.add_argument("--config", action="append", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    for name in args.config:
        batch, seq, hidden, heads = CONFIGS[name]
        torch, cell = make_cell(args.xlstm_dir, batch, hidden, heads)
        if args.build_only:
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(batch, seq, 4 * hidden, device="cuda", dtype=torch.bfloat16, generator=g)
        x.requires_grad_(True)
        dy = None

        def fwd():
            return cell(x)[0]

        def fwd_bwd():
            nonlocal dy
            y = cell(x)[0]
            if dy is None or dy.shape != y.shape:
                dy = torch.randn(y.shape, device="cuda", dtype=y.dtype, generator=g)
            y.backward(dy)

        y = fwd()
        print(f"{name}: output {tuple(y.shape)} {y.dtype}, finite {bool(torch.isfinite(y).all())}")
        fwd_bwd()  # first backward outside the timing (allocations)
        f = time_ms(torch, fwd, args.reps, args.warmup)
        fb = time_ms(torch, fwd_bwd, args.reps, args.warmup)
        print(f"ANCHOR {name} B{batch} S{seq} d{hidden} NH{heads}: fwd {f:.3f} ms "
              f"({f * 1e3 / seq:.2f} us/step), fwd+bwd {fb:.3f} ms ({fb * 1e3 / seq:.2f} us/step)",
              flush=True)


if __name__ == "__main__":
    main()
