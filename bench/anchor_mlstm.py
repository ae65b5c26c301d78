#!/usr/bin/env python3
"""Public anchor for bench/mlstm_bench: NX-AI/mlstm_kernels TFLA `chunkwise--triton_xl_chunk`.

Run on the GPU machine with the mlstm_kernels python package on PYTHONPATH (fetched from
github:NX-AI/mlstm_kernels, copied into the carry folder, never committed) and with
DISABLE_LLVM_OPT=1: without it Triton 3.6's LLVM aborts with an SLPVectorizer assertion on these
kernels (PERFORMANCE.md), so the anchor runs with LLVM optimisations off and its times are a
lower bound on its speed.

Shapes (same as mlstm_bench): xlstm-1.3b-like B8 S2048 NH4 dk256 dv512 chunk 128, and the
xLSTM-7B head layout B1 S8192 NH8 dk256 dv512 chunk 128; the xlstm-125m cell B16 S2048 NH4 dk384
dv384 at chunk 64 and 128. q, k, v, dh bf16 N(0, 1); ĩ N(0, 1),
f̃ N(3, 1) fp32; eps 1e-6. Times: triton.testing.do_bench medians (CUDA events, warm-up).

--dump DIR: also runs a small shape (B1 NH2 S512 dk128 dv128) once and writes inputs, h and
TFLA's gradients (raw float32, layout [B, NH, S, D]) for `mlstm_bench --compare_dir=DIR`.
"""
import argparse
import os
import sys

import torch
import triton

from mlstm_kernels.torch import get_mlstm_kernel


def make_inputs(B, NH, S, DK, DV, seed, grad):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=g)
    q = torch.randn(B, NH, S, DK, **kw).to(torch.bfloat16)
    k = torch.randn(B, NH, S, DK, **kw).to(torch.bfloat16)
    v = torch.randn(B, NH, S, DV, **kw).to(torch.bfloat16)
    i = torch.randn(B, NH, S, **kw)
    f = torch.randn(B, NH, S, **kw) + 3.0
    dh = torch.randn(B, NH, S, DV, **kw).to(torch.bfloat16)
    if grad:
        for t in (q, k, v, i, f):
            t.requires_grad_(True)
    return q, k, v, i, f, dh


def bench(kernel, name, B, S, NH, DK, DV, chunk):
    q, k, v, i, f, dh = make_inputs(B, NH, S, DK, DV, 0, True)

    def fwd():
        with torch.no_grad():
            return kernel(q=q, k=k, v=v, i=i, f=f, chunk_size=chunk, eps=1e-6)

    def fwdbwd():
        h = kernel(q=q, k=k, v=v, i=i, f=f, chunk_size=chunk, eps=1e-6)
        h.backward(dh)

    fwd_ms = triton.testing.do_bench(fwd, warmup=50, rep=200, return_mode="median")
    fb_ms = triton.testing.do_bench(fwdbwd, warmup=50, rep=200, return_mode="median",
                                    grad_to_none=[q, k, v, i, f])
    print(f"ANCHOR {name} B{B} S{S} NH{NH} dk{DK} dv{DV} L{chunk}: "
          f"fwd_ms={fwd_ms:.4f} fwdbwd_ms={fb_ms:.4f}", flush=True)


def dump(kernel, out_dir):
    B, NH, S, DK, DV = 1, 2, 512, 128, 128
    q, k, v, i, f, dh = make_inputs(B, NH, S, DK, DV, 123, True)
    h = kernel(q=q, k=k, v=v, i=i, f=f, chunk_size=128, eps=1e-6)
    h.backward(dh)
    os.makedirs(out_dir, exist_ok=True)

    def w(name, t):
        t.detach().float().contiguous().cpu().numpy().tofile(os.path.join(out_dir, name + ".f32"))

    w("dims", torch.tensor([B, NH, S, DK, DV], dtype=torch.float32))
    for name, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f), ("dh", dh), ("h", h),
                    ("dq", q.grad), ("dk", k.grad), ("dv", v.grad), ("di", i.grad),
                    ("df", f.grad)):
        w(name, t)
    print(f"ANCHOR dumped small-shape TFLA outputs to {out_dir}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default="")
    ap.add_argument("--shapes", default="1.3b,7b,125m-64,125m-128",
                    help="comma-separated subset of 1.3b, 7b, 125m-64, 125m-128")
    args = ap.parse_args()
    wanted = set(args.shapes.split(","))
    print("torch", torch.__version__, "triton", triton.__version__,
          "DISABLE_LLVM_OPT", os.environ.get("DISABLE_LLVM_OPT"), torch.cuda.get_device_name(),
          flush=True)
    kernel = get_mlstm_kernel("chunkwise--triton_xl_chunk")
    if args.dump:
        dump(kernel, args.dump)
    if "1.3b" in wanted:
        bench(kernel, "xlstm-1.3b-like", 8, 2048, 4, 256, 512, 128)
    if "7b" in wanted:
        bench(kernel, "xlstm-7b-heads", 1, 8192, 8, 256, 512, 128)
    # The xlstm-125m cell (4 heads of 384 at B16 S2048), at the presets' chunk 64 and at 128.
    if "125m-64" in wanted:
        bench(kernel, "xlstm-125m-cell", 16, 2048, 4, 384, 384, 64)
    if "125m-128" in wanted:
        bench(kernel, "xlstm-125m-cell", 16, 2048, 4, 384, 384, 128)
    return 0


if __name__ == "__main__":
    sys.exit(main())
