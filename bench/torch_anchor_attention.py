"""Public anchor for bench/attention_bench.cc, measured on the same card in the same call.

torch.nn.functional.scaled_dot_product_attention (causal, bf16, [B, H, T, D]) with the FLASH
and the CUDNN backends (torch.nn.attention.sdpa_kernel), at the bench's shapes: forward and
forward + backward. CUDA-event medians after warm-up, no L2 flush (same as the bench).
Run on the GPU machine:  python3 bench/torch_anchor_attention.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    torch.manual_seed(0)
    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for b, t, h, d in [(8, 2048, 16, 128), (2, 8192, 16, 128), (8, 2048, 12, 64)]:
        fwd_flop = 4.0 * b * h * t * t / 2 * d
        q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)
        for name, backend in [("flash", SDPBackend.FLASH_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
            try:
                with sdpa_kernel(backend):
                    def fwd():
                        with torch.no_grad():
                            F.scaled_dot_product_attention(q, k, v, is_causal=True)

                    def fwd_bwd():
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        q.grad = k.grad = v.grad = None
                        o.backward(do)
                    f = median_ms(fwd)
                    fb = median_ms(fwd_bwd)
                print(f"sdpa-{name:5s} fwd     B{b:<2d} S{t:<5d} H{h:<3d} D{d:<4d} {f:9.4f} ms "
                      f"{fwd_flop / f / 1e9:7.1f} TFLOP/s")
                print(f"sdpa-{name:5s} fwd+bwd B{b:<2d} S{t:<5d} H{h:<3d} D{d:<4d} {fb:9.4f} ms "
                      f"{3.5 * fwd_flop / fb / 1e9:7.1f} TFLOP/s")
            except RuntimeError as e:  # backend not available for this shape / build
                print(f"sdpa-{name} B{b} S{t} H{h} D{d}: unavailable ({str(e).splitlines()[0]})")
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
