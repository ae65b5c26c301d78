"""Public anchors for bench/recurrent_step_bench.cc: the same recurrent training steps in PyTorch,
measured on the same card in the same device call.

Models (same shapes as ops/ presets; random tokens, context 2048, fp32 master weights, bf16
autocast, fused AdamW lr 3e-4 betas (0.9, 0.95) eps 1e-5 wd 0.1, global-norm clip 1.0, eager):

  mamba2-130m / mamba2-1.3b  "ref": mamba_ssm's Mamba2 block layout in PyTorch (RMSNorm ->
        in_proj [z | xBC | dt] -> depthwise causal conv4 + SiLU (torch conv1d) -> the mamba_ssm
        Triton SSD `mamba_chunk_scan_combined` (dt softplus + bias, D skip, chunk 256) -> mamba_ssm
        Triton gated RMSNorm (norm(y * silu(z))) -> out_proj; residual), tied head.
        "hf": transformers Mamba2ForCausalLM at the same config (its own kernel choice: the
        mamba_ssm Triton path when transformers finds mamba_ssm, else its PyTorch SSD).
  xlstm[1:0]-125m / -1.3b    "ref": xLSTM v1 mLSTM blocks exactly as ops/recurrent_blocks.h (LN ->
        up [x_m | z] -> conv4 + SiLU -> 4x4 block-diagonal q, k (from x_c), v (from x_m) -> gates
        Linear(cat(q, k, v)) -> mLSTM cell -> GroupNorm(heads) + skip * x_c -> * SiLU(z) -> down),
        the cell from NX-AI/mlstm_kernels TFLA (`chunkwise--triton_xl_chunk`, chunk 64) when the
        package is on PYTHONPATH (run with DISABLE_LLVM_OPT=1, PERFORMANCE.md), else a native
        PyTorch chunkwise mLSTM. "hf": transformers xLSTMForCausalLM (native PyTorch chunkwise; its
        own xLSTM-7B block layout) at d 768, 12 blocks (PERFORMANCE.md's 73.6K row).
        Both "hf" variants FAILED on the device on 2026-11-26 (Mamba2: transformers' kernel path
        needs causal_conv1d, absent there; xLSTM: an in-place autograd error in its native
        chunkwise path), so the default is "ref" only; they stay selectable (--variants ref hf).
  xlstm-large-125m           PERFORMANCE.md's "xlstm-125m" row itself: transformers xLSTMForCausalLM,
        xLSTMConfig(hidden_size=768, num_blocks=12, num_heads=4, vocab_size=50304, chunk_size=64,
        mode="train"), every other field at its default (= ops/ preset xlstm-large-125m: dk 96,
        dv 192, FFN 2048, caps 15 / 30, untied, 162,303,840 parameters, printed). Variants:
        "hf"        transformers as it is (without the external `xlstm` package its backend always
                    runs its own chunkwise--native_autograd, whatever chunkwise_kernel says);
        "hf-native" the same model with each layer's training cell replaced by this file's
                    functional native PyTorch chunkwise mLSTM (mlstm_native_chunkwise: same math,
                    no in-place writes into state buffers), eager;
        "hf-tfla"   the same model with the cell replaced by NX-AI/mlstm_kernels TFLA
                    `chunkwise--triton_xl_chunk` (package on PYTHONPATH, DISABLE_LLVM_OPT=1).
        The cell replacement keeps everything else of transformers' block (projections, soft caps,
        multi-head LayerNorm, out gate, FFN, out norm, logit cap).

Step time: CUDA events around forward + backward + clip + optimizer step; warm-up, median.
MFU: same formula as recurrent_step_bench.cc (6 N tokens + cell terms) / 989 TFLOP/s.

Run on the GPU machine:
  PYTHONPATH=<mamba_ssm dir>:<mlstm_kernels dir> DISABLE_LLVM_OPT=1 \
      python3 bench/torch_anchor_recurrent.py --presets mamba2-130m xlstm[1:0]-125m --batches 16 16
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def round64(x):
    return 64 * math.ceil(x / 64.0 - 1e-9)


MAMBA = {"mamba2-130m": (768, 24), "mamba2-1.3b": (2048, 48)}
XLSTM = {"xlstm[1:0]-125m": (768, 24), "xlstm[1:0]-1.3b": (2048, 48)}
XLSTM_LARGE = {"xlstm-large-125m": (768, 12)}  # transformers xLSTMForCausalLM, 4 heads


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


# ---------------------------------------------------------------- Mamba-2

class Mamba2Block(nn.Module):
    def __init__(self, d, state=128, head_dim=64, expand=2, conv=4, chunk=256):
        super().__init__()
        from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as GatedRMSNorm
        self.di = expand * d
        self.heads = self.di // head_dim
        self.head_dim, self.state, self.chunk = head_dim, state, chunk
        self.norm = RMSNorm(d)
        self.in_proj = nn.Linear(d, 2 * self.di + 2 * state + self.heads, bias=False)
        cx = self.di + 2 * state
        self.conv = nn.Conv1d(cx, cx, conv, groups=cx, padding=conv - 1)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1, 16)))
        dt = torch.exp(torch.empty(self.heads).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.gated_norm = GatedRMSNorm(self.di, eps=1e-5, norm_before_gate=False)
        self.out_proj = nn.Linear(self.di, d, bias=False)

    def forward(self, x):
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        B, T, _ = x.shape
        zxbcdt = self.in_proj(self.norm(x))
        z, xbc, dt = torch.split(zxbcdt, [self.di, self.di + 2 * self.state, self.heads], dim=-1)
        xbc = F.silu(self.conv(xbc.transpose(1, 2))[..., :T].transpose(1, 2))
        xs, b, c = torch.split(xbc, [self.di, self.state, self.state], dim=-1)
        y = mamba_chunk_scan_combined(xs.reshape(B, T, self.heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
                                      b.reshape(B, T, 1, self.state), c.reshape(B, T, 1, self.state),
                                      chunk_size=self.chunk, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        y = self.gated_norm(y.reshape(B, T, self.di), z)
        return x + self.out_proj(y)


class Mamba2LM(nn.Module):
    def __init__(self, d, layers, vocab=50288):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList([Mamba2Block(d) for _ in range(layers)])
        self.final_norm = RMSNorm(d)

    def forward(self, ids, targets):
        x = self.embedding(ids)
        for b in self.blocks:
            x = b(x)
        logits = F.linear(self.final_norm(x), self.embedding.weight)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------- xLSTM v1 (mLSTM blocks)

def mlstm_native_chunkwise(q, k, v, i, f, chunk, eps=1e-6, return_last_states=False):
    """Chunkwise mLSTM in PyTorch, [B, NH, S, D] (stabilised as the xLSTM paper; sigmoid forget)."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    L = chunk
    assert S % L == 0
    NC = S // L
    q = q.float().reshape(B, NH, NC, L, DK) * DK ** -0.5  # reshape: transformers passes transposed views
    k = k.float().reshape(B, NH, NC, L, DK)
    v = v.float().reshape(B, NH, NC, L, DV)
    lf = F.logsigmoid(f.float()).reshape(B, NH, NC, L)
    i = i.float().reshape(B, NH, NC, L)
    b = lf.cumsum(-1)                                   # within-chunk log decay
    C = torch.zeros(B, NH, DK, DV, device=q.device)
    n = torch.zeros(B, NH, DK, device=q.device)
    m = torch.full((B, NH), -1e30, device=q.device)
    hs = []
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    for c in range(NC):
        bc, ic = b[:, :, c], i[:, :, c]
        D = bc[..., :, None] - bc[..., None, :] + ic[..., None, :]
        D = D.masked_fill(~mask, -float("inf"))
        m_intra = D.amax(-1)
        m_inter = bc + m[..., None]
        mt = torch.maximum(m_intra, m_inter)
        Dm = torch.exp(D - mt[..., None])
        qc, kc, vc = q[:, :, c], k[:, :, c], v[:, :, c]
        Sm = (qc @ kc.transpose(-1, -2)) * Dm
        inter = torch.exp(m_inter - mt)[..., None]
        num = Sm @ vc + inter * (qc @ C)
        den = Sm.sum(-1, keepdim=True) + inter * (qc @ n[..., None])
        h = num / torch.maximum(den.abs(), torch.exp(-mt)[..., None])
        hs.append(h)
        # state to the end of the chunk
        g = bc[..., -1:] - bc + ic                       # decay from t to the chunk end
        m_new = torch.maximum(bc[..., -1] + m, g.amax(-1))
        w = torch.exp(g - m_new[..., None])
        decay = torch.exp(bc[..., -1] + m - m_new)
        C = decay[..., None, None] * C + (kc * w[..., None]).transpose(-1, -2) @ vc
        n = decay[..., None] * n + (kc * w[..., None]).sum(-2)
        m = m_new
    h = torch.stack(hs, 2).reshape(B, NH, S, DV)
    return (h, (C, n, m[..., None])) if return_last_states else h


def mlstm_cell():
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
        kernel = get_mlstm_kernel("chunkwise--triton_xl_chunk")
        return "TFLA chunkwise--triton_xl_chunk", lambda q, k, v, i, f, L: kernel(q=q, k=k, v=v, i=i, f=f, chunk_size=L, eps=1e-6)
    except Exception as e:  # noqa: BLE001 - report and fall back
        print(f"mlstm_kernels unavailable ({type(e).__name__}: {e}); native PyTorch chunkwise", flush=True)
        return "native PyTorch chunkwise", mlstm_native_chunkwise


class LayerNormOnePlusW(nn.Module):
    def __init__(self, d, groups=1):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.groups = groups

    def forward(self, x):
        shape = x.shape
        xf = x.float().reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        xf = F.layer_norm(xf, xf.shape[-1:], eps=1e-5).reshape(shape)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class MlstmBlock(nn.Module):
    def __init__(self, d, cell, heads=4, chunk=64, bs=4):
        super().__init__()
        self.p = round64(2.0 * d)
        self.heads, self.chunk, self.bs, self.cell = heads, chunk, bs, cell
        self.norm = LayerNormOnePlusW(d)
        self.up = nn.Linear(d, 2 * self.p, bias=False)
        self.conv = nn.Conv1d(self.p, self.p, 4, groups=self.p, padding=3)
        nb = self.p // bs
        self.wq = nn.Parameter(torch.randn(nb, bs, bs) * bs ** -0.5)
        self.wk = nn.Parameter(torch.randn(nb, bs, bs) * bs ** -0.5)
        self.wv = nn.Parameter(torch.randn(nb, bs, bs) * bs ** -0.5)
        self.igate = nn.Linear(3 * self.p, heads)
        self.fgate = nn.Linear(3 * self.p, heads)
        nn.init.zeros_(self.igate.weight)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3, 6, heads))
        self.outnorm = LayerNormOnePlusW(self.p, heads)
        self.skip = nn.Parameter(torch.ones(self.p))
        self.down = nn.Linear(self.p, d, bias=False)

    def bd(self, x, w):
        B, T, _ = x.shape
        return torch.einsum("btni,noi->btno", x.reshape(B, T, -1, self.bs), w).reshape(B, T, -1)

    def forward(self, x):
        B, T, _ = x.shape
        xm, z = self.up(self.norm(x)).chunk(2, dim=-1)
        xc = F.silu(self.conv(xm.transpose(1, 2))[..., :T].transpose(1, 2))
        q, k, v = self.bd(xc, self.wq), self.bd(xc, self.wk), self.bd(xm, self.wv)
        qkv = torch.cat([q, k, v], -1)
        ig, fg = self.igate(qkv).float(), self.fgate(qkv).float()
        heads = lambda t: t.reshape(B, T, self.heads, -1).transpose(1, 2)
        h = self.cell(heads(q), heads(k), heads(v), ig.transpose(1, 2).contiguous(), fg.transpose(1, 2).contiguous(),
                      self.chunk)
        h = h.transpose(1, 2).reshape(B, T, self.p).to(x.dtype)
        out = (self.outnorm(h) + self.skip * xc) * F.silu(z)
        return x + self.down(out)


class XlstmLM(nn.Module):
    def __init__(self, d, layers, cell, vocab=50304):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([MlstmBlock(d, cell) for _ in range(layers)])
        self.final_norm = LayerNormOnePlusW(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, targets):
        x = self.embedding(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.final_norm(x))
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------- transformers variants

class HfLM(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, targets):
        # use_cache=False: with the default cache, transformers' xLSTM feeds the cache's zero states in
        # as c / n / m_initial and then overwrites them in place, which is the "modified by an inplace
        # operation" autograd error of the 2026-11-26 and session-21 calls (a [16, 4, 96] n state).
        logits = self.model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def hf_mamba2(d, layers):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    cfg = Mamba2Config(hidden_size=d, num_hidden_layers=layers, state_size=128, head_dim=64, expand=2, n_groups=1,
                       num_heads=2 * d // 64, chunk_size=256, conv_kernel=4, vocab_size=50288, tie_word_embeddings=True,
                       use_bias=False, use_conv_bias=True)
    return HfLM(Mamba2ForCausalLM(cfg))


def hf_xlstm(d, layers):
    from transformers import xLSTMConfig, xLSTMForCausalLM
    cfg = xLSTMConfig(hidden_size=d, num_blocks=layers, num_heads=4, vocab_size=50304, chunk_size=64,
                      mode="train", chunkwise_kernel="chunkwise--native_autograd",
                      sequence_kernel="native_sequence__native", step_kernel="native")
    return HfLM(xLSTMForCausalLM(cfg))


def hf_xlstm_large(d, layers, cell):
    """PERFORMANCE.md's xlstm-125m: only the four fields its row names, the rest xLSTMConfig's defaults
    (mode "train" so the backend runs its training kernel). cell: None (transformers' own), "native" or
    "tfla" (replaces every layer's training cell function; see the top of this file)."""
    import transformers
    from transformers import xLSTMConfig, xLSTMForCausalLM
    cfg = xLSTMConfig(hidden_size=d, num_blocks=layers, num_heads=4, vocab_size=50304, chunk_size=64, mode="train")
    print(f"transformers {transformers.__version__}: xLSTMConfig qk_dim_factor {cfg.qk_dim_factor} v_dim_factor "
          f"{cfg.v_dim_factor} ffn_proj_factor {cfg.ffn_proj_factor} round {cfg.ffn_round_up_to_multiple_of} "
          f"gate_soft_cap {cfg.gate_soft_cap} output_logit_soft_cap {cfg.output_logit_soft_cap} tie "
          f"{cfg.tie_word_embeddings} norm_eps {cfg.norm_eps} eps {cfg.eps} chunk {cfg.chunk_size} weight_mode "
          f"{cfg.weight_mode} use_bias {cfg.use_bias} add_out_norm {cfg.add_out_norm} chunkwise_kernel "
          f"{cfg.chunkwise_kernel} autocast_kernel_dtype {cfg.autocast_kernel_dtype}", flush=True)
    model = xLSTMForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    print(f"xlstm-large-125m (transformers): sum(p.numel()) = {total:,} (ops/ preset: 162,303,840: "
          f"{'EQUAL' if total == 162303840 else 'DIFFERENT'})", flush=True)
    if cell is not None:
        if cell == "native":
            fn = lambda q, k, v, i, f, L: mlstm_native_chunkwise(q, k, v, i, f, L, return_last_states=True)
        else:
            from mlstm_kernels.torch import get_mlstm_kernel
            kernel = get_mlstm_kernel("chunkwise--triton_xl_chunk")
            fn = lambda q, k, v, i, f, L: kernel(q=q, k=k, v=v, i=i, f=f, chunk_size=L, eps=1e-6,
                                                 return_last_states=True)
        L = cfg.chunk_size

        def train_fn(query, key, value, igate, fgate, c_initial=None, n_initial=None, m_initial=None,
                     return_last_states=True, **kw):
            assert c_initial is None, "training from a zero state only"
            h, state = fn(query, key, value, igate, fgate, L)
            return (h, state) if return_last_states else h

        replaced = 0
        for mod in model.modules():
            if hasattr(mod, "_train_fn"):
                mod._train_fn = train_fn
                replaced += 1
        print(f"replaced the training cell of {replaced} layers with {cell}", flush=True)
        if replaced != layers:
            raise RuntimeError(f"expected {layers} backends, found {replaced}")
    return HfLM(model)


# ---------------------------------------------------------------- timing

def cell_flops_per_token(kind, d, layers, seq):
    if kind == "mamba2":
        H, P, N, Q = 2 * d // 64, 64, 128, 256
        return 3.0 * layers * H * (Q * (N + P) + 4 * N * P)
    if kind == "xlstm-large":  # ops/flops.cc: NH (L (dk + dv) + 4 dk dv) forward, x3 training
        NH, L = 4, 64
        dk, dv = d / 2 / NH, d / NH
        return 3.0 * layers * NH * (L * (dk + dv) + 4 * dk * dv)
    p = round64(2.0 * d)
    dk, L = p / 4, 64
    return 3.0 * layers * 4 * (L * 2 * dk + 4 * dk * dk)


def bench(name, variant, batch, seq, warmup, steps, peak):
    torch.manual_seed(0)
    kind = "mamba2" if name.startswith("mamba2") else "xlstm-large" if name in XLSTM_LARGE else "xlstm"
    d, layers = {"mamba2": MAMBA, "xlstm": XLSTM, "xlstm-large": XLSTM_LARGE}[kind][name]
    label = ""
    if kind == "xlstm-large":
        cells = {"hf": None, "hf-native": "native", "hf-tfla": "tfla"}
        if variant not in cells:
            raise ValueError(f"{name} has the variants {list(cells)}")
        model = hf_xlstm_large(d, layers, cells[variant])
        label = {"hf": "transformers, its own chunkwise--native_autograd",
                 "hf-native": "transformers, cell = native PyTorch chunkwise (this file)",
                 "hf-tfla": "transformers, cell = TFLA triton_xl_chunk"}[variant] + ", eager"
    elif variant == "hf":
        if kind == "mamba2":
            model = hf_mamba2(d, layers)
        else:
            layers = 12 if d == 768 else layers
            model = hf_xlstm(d, layers)
        label = "transformers"
    elif kind == "mamba2":
        model, label = Mamba2LM(d, layers), "mamba_ssm Triton SSD + gated norm"
    else:
        label, cell = mlstm_cell()
        model = XlstmLM(d, layers, cell)
    model = model.cuda()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-5, fused=True)
    vocab = 50288 if kind == "mamba2" else 50304

    def step(ids, tgt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, losses = [], []
    t0 = time.time()
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
    times.sort()
    med = times[len(times) // 2]
    tokens = batch * seq
    n_dense = sum(p.numel() for n, p in model.named_parameters() if "embedding" not in n and "lm_head" not in n
                  and "embeddings" not in n)
    flops = 6.0 * n_dense * tokens + cell_flops_per_token(kind, d, layers, seq) * tokens
    print(f"torch {name} [{variant}: {label}] {layers} layers, batch {batch} x {seq}: N(no emb, no head) "
          f"{n_dense / 1e6:.1f}M, step median {med * 1e3:.2f} ms (min {times[0] * 1e3:.2f}, max {times[-1] * 1e3:.2f}, "
          f"{steps} steps), {tokens / med:.0f} tokens/s, MFU {100 * flops / med / peak / 1e12:.1f}%, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, total {time.time() - t0:.1f} s", flush=True)
    del model, opt
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["mamba2-130m", "xlstm[1:0]-125m"])
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 16])
    ap.add_argument("--variants", nargs="+", default=["ref"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for name, batch in zip(args.presets, args.batches):
        for variant in args.variants:
            try:
                bench(name, variant, batch, args.seq, args.warmup, args.steps, args.peak_tflops)
            except Exception as e:  # noqa: BLE001 - one failing anchor must not hide the others
                print(f"torch {name} [{variant}] FAILED: {type(e).__name__}: {e}", flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
