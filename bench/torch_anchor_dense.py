"""Public anchors for bench/cuda_dense_bench.cc, measured on the same card in the same call.

PyTorch (cuBLAS via torch.mm / F.linear, fused AdamW, F.cross_entropy on materialised logits)
at the llama-125m / llama-1.3b shapes, 16,384 tokens. CUDA-event medians after warm-up.
Run on the GPU machine:  python3 bench/torch_anchor_dense.py
"""
import torch
import torch.nn.functional as F


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
    n = 16384
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for tag, d, ffn, vocab, params in [("llama-125m", 768, 2048, 50304, 162_220_800),
                                       ("llama-1.3b", 2048, 5504, 50304, 1_420_396_544)]:
        shapes = [("qkv", d, 3 * d), ("o", d, d), ("gate_up", d, 2 * ffn), ("down", ffn, d)]
        for name, k_in, k_out in shapes:
            x = torch.randn(n, k_in, device=dev, dtype=torch.bfloat16)
            w = torch.randn(k_out, k_in, device=dev, dtype=torch.bfloat16)
            dy = torch.randn(n, k_out, device=dev, dtype=torch.bfloat16)
            flop = 2.0 * n * k_in * k_out
            for what, fn in [("fwd", lambda: F.linear(x, w)),
                             ("bwd dX", lambda: dy @ w),
                             ("bwd dW", lambda: dy.t() @ x)]:
                ms = median_ms(fn)
                print(f"{tag} torch gemm {what:6s} {name:8s} N={n} in={k_in} out={k_out}  {ms:8.4f} ms  {flop / ms / 1e9:7.1f} TFLOP/s")
        # Linear + cross-entropy, materialised logits (what PyTorch does without a fused kernel).
        h = torch.randn(n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(vocab, d, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
        t = torch.randint(0, vocab, (n,), device=dev)

        def ce():
            loss = F.cross_entropy(F.linear(h, w).float(), t)
            loss.backward()
        ms = median_ms(ce, reps=10)
        print(f"{tag} torch linear+CE loss+dh+dW N={n} V={vocab} d={d}  {ms:8.4f} ms  ({6.0 * n * d * vocab / ms / 1e9:.1f} TFLOP/s)")
        del h, w
        # Fused AdamW over fp32 parameters of the model's size (75 / 147 tensors like the bench).
        count = 75 if tag == "llama-125m" else 147
        sizes = [params // count] * count
        ps = [torch.randn(s, device=dev, requires_grad=True) for s in sizes]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=True)

        def adam():
            torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)
            opt.step()
        ms = median_ms(adam, reps=10)
        print(f"{tag} torch adamw fused + clip_grad_norm params={sum(sizes)}  {ms:8.4f} ms")
        del ps, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
