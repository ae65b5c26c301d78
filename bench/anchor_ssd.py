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
"""
import argparse
import sys

import torch
import torch.nn.functional as F
import triton


def ssd_anchor(batch, seq, heads=64, headdim=64, dstate=128, groups=1, chunk=256):
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
    t_f = triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median")
    t_fb = triton.testing.do_bench(fwd_bwd, warmup=50, rep=300, grad_to_none=leaves,
                                   return_mode="median")
    return t_f, t_fb


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
    args = p.parse_args()
    sys.path.insert(0, args.anchor_dir)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}")
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
