"""Public anchor for bench/llama_step_bench.cc: the same Llama (Transformer++) training step in
PyTorch, measured on the same card in the same device call.

Model (= ops/llama_block.h + ops/model.h for the llama-125m / llama-1.3b presets): token
embedding, L blocks of [RMSNorm -> q/k/v (no bias) -> RoPE (rotate half, theta 1e4) -> causal
SDPA -> o_proj; residual; RMSNorm -> SwiGLU (hidden 64*ceil(8d/3/64)); residual], final RMSNorm,
untied LM head, vocab 50304. fp32 master weights, bf16 autocast, fused AdamW (lr 3e-4, betas
(0.9, 0.95), eps 1e-5, wd 0.1), global-norm clip 1.0, torch.compile of the model, random tokens,
context 2048. Step time: CUDA events around forward + backward + clip + optimizer step; warm-up
first, median of the rest. MFU uses the same formula as llama_step_bench.cc:
6 N tokens (N without embedding and head) + 6 L d T tokens (causal attention), / 989 TFLOP/s.

Run on the GPU machine:  python3 bench/torch_anchor_llama.py [--presets llama-125m llama-1.3b]
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # d, layers, heads, head_dim, vocab (ops/model_config.cc)
    "llama-125m": (768, 12, 12, 64, 50304),
    "llama-1.3b": (2048, 24, 16, 128, 50304),
}


def ffn_dim(d):
    return 64 * math.ceil(8.0 * d / 3.0 / 64)


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope(x, cos, sin):  # x [B, H, T, D]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, d, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.attn_norm = RMSNorm(d)
        self.q = nn.Linear(d, heads * head_dim, bias=False)
        self.k = nn.Linear(d, heads * head_dim, bias=False)
        self.v = nn.Linear(d, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        h = ffn_dim(d)
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, d, layers, heads, head_dim, vocab):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads, head_dim) for _ in range(layers)])
        self.final_norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.head_dim = head_dim
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids, targets):
        T = ids.shape[1]
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.head_dim // 2, device=ids.device, dtype=torch.float32) * 2 / self.head_dim))
        ang = torch.arange(T, device=ids.device, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        x = self.embedding(ids)
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.lm_head(self.final_norm(x))
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def bench(name, batch, seq, warmup, steps, peak):
    d, layers, heads, head_dim, vocab = PRESETS[name]
    torch.manual_seed(0)
    model = Llama(d, layers, heads, head_dim, vocab).cuda()
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-5, fused=True)
    cmodel = torch.compile(model)

    def step(ids, tgt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cmodel(ids, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    times, losses = [], []
    for s in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq + 1), device="cuda")
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
        b.record()
        torch.cuda.synchronize()
        losses.append(loss.item())
        if s >= warmup:
            times.append(a.elapsed_time(b) / 1e3)
        if s == 0:
            compile_s = time.time() - t0
    times.sort()
    med = times[len(times) // 2]
    tokens = batch * seq
    n_dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("embedding", "lm_head")))
    flops = 6.0 * n_dense * tokens + 6.0 * layers * heads * head_dim * seq * tokens
    flops_head = flops + 6.0 * vocab * d * tokens
    print(f"torch {name} batch {batch} x {seq}: N(no emb, no head) {n_dense / 1e6:.1f}M, step median {med * 1e3:.2f} ms "
          f"(min {times[0] * 1e3:.2f}, max {times[-1] * 1e3:.2f}, {steps} steps), {tokens / med:.0f} tokens/s, "
          f"MFU {100 * flops / med / peak / 1e12:.1f}% ({100 * flops_head / med / peak / 1e12:.1f}% with LM head), "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, first step (compile) {compile_s:.1f} s", flush=True)
    del model, cmodel, opt
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["llama-125m", "llama-1.3b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 8])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name, batch in zip(a.presets, a.batches):
        bench(name, batch, a.seq, a.warmup, a.steps, a.peak_tflops)


if __name__ == "__main__":
    main()
