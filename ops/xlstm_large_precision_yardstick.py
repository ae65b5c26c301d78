"""External yardstick for the xLSTM Large bf16 forward's distance from float64 (ops/XLSTM_LARGE.md,
"Session 21 (helper xlprec): precision"). transformers' xLSTMForCausalLM at decode_gpu_test's shape
(d 512, 4 heads, dk 64, dv 128, 3 blocks, FFN 1408, vocab 512, gate cap 15, logit cap 30) with the
weight distributions Gyre's tests use, run in float64 and in bf16 (the whole model cast, and fp32
weights under torch.autocast), logits compared as Gyre's RelativeError does
(||a - b|| / max(||a||, ||b||)). A transformers Llama at decode_gpu_test's Llama shape (d 128) with the
same norm randomisation is the other family's yardstick. Device only (torch + transformers there):
    python3 xlstm_large_precision_yardstick.py
"""
import math
import sys
import traceback

import torch

D, NH, L, V, FFN = 512, 4, 3, 512, 1408
B, T = 2, 100


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(a.norm(), b.norm())).item()


def bf16_values(w):
    return w.to(torch.bfloat16).to(torch.float64)


def set_xlstm_weights(model, mode, seed=8):
    """mode: 'tweak' (decode_gpu_test's Randomise + XlstmLargeTweak), 'randomise' (Randomise only),
    'init' (the block's own init: gate weights 0, input-gate bias -10, forget-gate bias linspace(3, 6),
    norm scales 1)."""
    g = torch.Generator().manual_seed(seed)
    small = math.sqrt(2 / (5 * D))
    unknown = []
    for name, p in model.named_parameters():
        n = lambda: torch.randn(p.shape, generator=g, dtype=torch.float64)
        # q / k / v are "query" / "key" / "value" in transformers 4.5x and "q" / "k" / "v" in 5.x.
        if name.endswith(("query.weight", "key.weight", "value.weight", ".q.weight", ".k.weight", ".v.weight",
                          "ogate_preact.weight", "proj_up_gate.weight", "proj_up.weight")) or "embedding" in name:
            w = small * n()
        elif name.endswith("out_proj.weight"):
            w = 2 / (L * math.sqrt(D)) * n()
        elif name.endswith("proj_down.weight"):
            w = 2 / (L * math.sqrt(FFN)) * n()
        elif "igate_preact" in name or "fgate_preact" in name:
            forget = "fgate" in name
            if name.endswith("weight"):
                w = 0.03 * n() if mode == "tweak" else torch.zeros(p.shape, dtype=torch.float64)
            elif mode == "tweak":
                w = n() + (4.0 if forget else 0.0)
            elif mode == "randomise":
                w = 0.3 * n()
            else:
                w = torch.linspace(3, 6, NH, dtype=torch.float64) if forget else torch.full(p.shape, -10.0, dtype=torch.float64)
        elif "norm" in name:
            w = 0.3 * n() if mode != "init" else torch.ones(p.shape, dtype=torch.float64)
        elif name.startswith("lm_head"):
            w = 1.25 * n() if mode == "tweak" else small * n()
        else:
            unknown.append(name)
            continue
        with torch.no_grad():
            p.copy_(bf16_values(w).to(p.dtype))
    if unknown:  # left at transformers' init and NOT bf16 numbers: the bf16 rows then include their rounding
        print("  (parameters left at their init: %s)" % ", ".join(unknown))


def four_precisions(model, ids):
    """Logits of `model` on `ids` in float64 (the reference), float32, bf16 autocast and pure bf16
    (in that order: each conversion changes the model in place)."""
    with torch.no_grad():
        ref = model.double().cuda()(ids).logits.double()
        f32 = model.float()(ids).logits.double()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            auto = model(ids).logits.double()
        bf = model.to(torch.bfloat16)(ids).logits.double()
    return ref, f32, auto, bf


def xlstm_case(mode, chunk, seq):
    from transformers import xLSTMConfig, xLSTMForCausalLM
    cfg = xLSTMConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_blocks=L, num_heads=NH,
                      qk_dim_factor=0.5, v_dim_factor=1.0, gate_soft_cap=15.0, output_logit_soft_cap=30.0,
                      norm_eps=1e-6, eps=1e-6, chunk_size=chunk, mode="inference", weight_mode="single",
                      use_bias=False, tie_word_embeddings=False, add_out_norm=True, ffn_proj_factor=2.667,
                      ffn_round_up_to_multiple_of=64, use_cache=False)
    torch.manual_seed(0)
    model = xLSTMForCausalLM(cfg)
    set_xlstm_weights(model, mode)
    ids = torch.randint(0, V, (B, seq), generator=torch.Generator().manual_seed(9)).cuda()
    return four_precisions(model, ids)


def llama_case():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().double().cpu()
            if "norm" in name:
                w = 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(bf16_values(w).to(p.dtype))
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9)).cuda()
    return four_precisions(model, ids)


def main():
    import transformers
    print("torch %s, transformers %s, %s" % (torch.__version__, transformers.__version__, torch.cuda.get_device_name()))
    rows = []
    cases = [("xlstm-large", m, c, s) for m in ("tweak", "randomise", "init") for c, s in ((128, T), (64, 128))]
    cases.append(("llama d128", "randomise", 0, T))
    for family, mode, chunk, seq in cases:
        label = "%s %s B%d T%d%s" % (family, mode, B, seq, (" chunk %d (%s)" % (chunk, "chunkwise" if seq >= chunk else "recurrent")) if chunk else "")
        try:
            ref, f32, auto, bf = xlstm_case(mode, chunk, seq) if family == "xlstm-large" else llama_case()
            rows.append("%-58s fp32 %.3e  bf16 autocast %.3e  bf16 model %.3e  (max |logit| %.1f)" % (
                label, rel(f32, ref), rel(auto, ref), rel(bf, ref), ref.abs().max().item()))
        except Exception as e:  # report and go on: one API difference must not hide the other rows
            traceback.print_exc()
            rows.append("%-58s failed: %s" % (label, str(e).splitlines()[0][:120]))
    print("== logits vs float64 (relative error)")
    for r in rows:
        print(r)


if __name__ == "__main__":
    sys.exit(main())
