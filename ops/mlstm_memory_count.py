#!/usr/bin/env python3
"""Device bytes of one xLSTM training step on CUDA, counted from the code (helper mem11).

Counts what ops/ allocates through the caching DeviceAllocator (kernels/cuda/device_allocator.cc:
every request is rounded to its size class: 256 B below 4 KiB, else quarter steps of a power of
two) for xlstm[1:0]-1.3b / xlstm[7:1]-1.3b at S 2048, per mLSTM recomputation mode
(ops/recurrent_blocks.h, GYRE_MLSTM_RECOMPUTE). No device: nothing here was measured.

  python3 ops/mlstm_memory_count.py            # the tables of ops/MLSTM_MEMORY.md
"""
import math

GiB = 1 << 30
MiB = 1 << 20


def cls(b):
    """DeviceAllocator::ClassBytes."""
    if b <= 4096:
        return (b + 255) // 256 * 256
    p = 4096
    while p * 2 <= b:
        p *= 2
    q = p // 4
    return (b + q - 1) // q * q


def align(x):
    return (x + 255) // 256 * 256


def mlstm_saved(B, S, NH, dk, dv, L, split=True):
    """kernels/cuda/mlstm.cu MakeSaved."""
    bh, nc = B * NH, (S + L - 1) // L
    parts = {
        "C_k hi  bf16 [BH, NC+1, dk, dv]": align(bh * (nc + 1) * dk * dv * 2),
        "C_S     f32  [BH, dk, dv]": align(bh * dk * dv * 4),
        "n_k     f32  [BH, NC+1, dk]": align(bh * (nc + 1) * dk * 4),
        "m_k + 4 per-token f32 + decay": align(bh * (nc + 1) * 4) + 4 * align(bh * S * 4) + align(bh * nc * 4),
    }
    if split:
        parts["C_k lo  bf16 [BH, NC+1, dk, dv]"] = align(bh * (nc + 1) * dk * dv * 2)
        parts["h lo    bf16 [B, S, NH, dv]"] = align(bh * S * dv * 2)
    return parts


def mlstm_tokens(B, S, NH, dv, split=True):
    """kernels/cuda/mlstm.cu MakeTokens: the per-token part of saved that only fwd_out writes
    (den_t f32 [BH, S], h lo bf16 [B, S, NH, dv]), kept by GYRE_MLSTM_RECOMPUTE=states."""
    return align(B * NH * S * 4) + (align(B * S * NH * dv * 2) if split else 0)


def mlstm_scratch(B, S, NH, dk, dv, L, split=True):
    """kernels/cuda/mlstm.cu MakeScratch (state tile 128, dqk slab 128 at this shape)."""
    bh, nc = B * NH, (S + L - 1) // L
    tile = 128 if (dk % 128 == 0 and dv % 128 == 0 and bh * (dk // 128) * (dv // 128) >= 128) else 64
    nt = dk // 128
    t = align(bh * nc * dk * dv * 2) * (2 if split else 1)
    t += align(bh * (nc + 1) * (dv // tile) * dk * 4)
    t += 5 * align(bh * S * 4) + 2 * align(bh * S * nt * 4) + align(bh * S * 4) + 2 * align(bh * S * 8)
    return t


def params(d, p, heads, layers, slstm_layers, vocab, ffn):
    per_m = d + 2 * p * d + p * 4 + p + 3 * (p // 4) * 16 + 2 * (3 * p * heads + heads) + p + p + d * p
    dh = d // 4
    per_s = d + d * 4 + d + 4 * 4 * dh * dh + 4 * d + 4 * dh * dh * 4 + d + d + 2 * ffn * d + ffn * d
    n_m = layers - slstm_layers
    return {"mlstm_block": per_m, "slstm_block": per_s, "blocks": n_m * per_m + slstm_layers * per_s,
            "embedding": vocab * d, "head": vocab * d, "final_norm": d}


def model_state(P, tensors):
    """Flat value (f32), grad (f32), compute (bf16) buffers + AdamW m, v per tensor (f32)."""
    total = sum((n + 7) // 8 * 8 for n in tensors)
    flat = cls(total * 4) * 2 + cls(total * 2)
    adam = 2 * sum(cls(n * 4) for n in tensors)
    return flat, adam, total


def block_tensors(d, p, heads):
    return [d, 2 * p * d, p * 4, p, p * 4, p * 4, p * 4, 3 * p * heads, heads, 3 * p * heads, heads, p, p, d * p]


def account(preset, B, mode, S=2048, d=2048, p=4096, NH=4, layers=48, slstm=0, vocab=50304, L=128, keep=0):
    rows = B * S
    dk = p // NH
    act = lambda cols, size=2: cls(rows * cols * size)
    saved = mlstm_saved(B, S, NH, dk, dk, L)
    saved_bytes = cls(sum(saved.values()))
    scratch = cls(mlstm_scratch(B, S, NH, dk, dk, L))
    # Kept between a block's forward and its backward (ops/recurrent_blocks.cc ForwardCuda).
    keep_all = {
        "x (block input; norm_ keeps it)": act(d),
        "LN stats mean, rstd f32 [rows]": 2 * cls(rows * 4),
        "u = LN(x)": act(d),
        "x_m (up GEMM; conv_ shares it)": act(p),
        "z (up GEMM)": act(p),
        "x_c = SiLU(conv(x_m))": act(p),
        "q, k, v": 3 * act(p),
        "ig, fg f32 [rows, NH]": 2 * cls(rows * NH * 4),
        "cell saved (C_k hi+lo, C_S, n, m, h lo, per-token)": saved_bytes,
        "h": act(p),
        "out-norm mean, rstd f32 [rows, NH]": 2 * cls(rows * NH * 4),
        "out = (GN(h) + s*x_c)*SiLU(z) (down_ keeps it)": act(p),
    }
    recomputed = {
        "none": set(),
        "cell": {"cell saved (C_k hi+lo, C_S, n, m, h lo, per-token)", "h", "out-norm mean, rstd f32 [rows, NH]",
                 "out = (GN(h) + s*x_c)*SiLU(z) (down_ keeps it)"},
        "block": set(keep_all) - {"x (block input; norm_ keeps it)"},
    }
    recomputed["glue"] = recomputed["cell"] | {"u = LN(x)", "x_c = SiLU(conv(x_m))", "q, k, v",
                                               "ig, fg f32 [rows, NH]"}
    # states (helper mem12): glue, but h and the saved's per-token part (den_t, h lo) stay; the
    # backward rebuilds only the chunk states (gate scan + state_fwd).
    recomputed["states"] = recomputed["glue"] - {"h"}
    kept = {k: v for k, v in keep_all.items() if k not in recomputed[mode]}
    if mode == "states":
        kept["cell tokens (den_t f32, h lo bf16)"] = cls(mlstm_tokens(B, S, NH, dk))
    per_layer = sum(kept.values())
    forward_all = sum(keep_all.values())  # everything of one block alive at its forward's end
    # Backward transient of one block at the cell backward (the peak inside a block's backward):
    # the incoming dy [rows, d], recomputed tensors (all of keep_all again), dh, dz, dx_c, dq, dk,
    # dv, dig, dfg, the cell's scratch; dout [rows, p] too unless freed early (new modes).
    grads = 6 * act(p) + 2 * cls(rows * NH * 4) + scratch
    dout = act(p) if mode == "none" else 0
    recomputed_here = sum(v for k, v in keep_all.items() if k in recomputed[mode])
    if mode in ("glue", "states"):
        recomputed_here -= keep_all["u = LN(x)"]  # recomputed after the cell backward
    if mode != "none":
        recomputed_here -= keep_all["out = (GN(h) + s*x_c)*SiLU(z) (down_ keeps it)"]  # freed after down's backward
    bwd_peak = act(d) + recomputed_here + grads + dout
    # sLSTM layers (xlstm[7:1]) at their default path, roughly: x, u, x_c, h, x1, the FFN norm's
    # output and the group norm's [rows, d] bf16; gx [rows, 4d] bf16; the cell's saved fp32
    # [rows, 7, d] (kernels/cuda/slstm.cu kSavedRows: i, f, z, o, c, n, m); the FFN's
    # [gate | up] and act [rows, ffn] bf16.
    ffn = 64 * math.ceil(1.3 * d / 64)
    slstm_layer = act(d) * 7 + act(4 * d) + cls(rows * 7 * d * 4) + act(ffn) * 3
    n_m = layers - slstm
    acts = (n_m - keep) * per_layer + keep * sum(keep_all.values()) + slstm * slstm_layer
    P = params(d, p, NH, layers, slstm, vocab, ffn)
    tensors = block_tensors(d, p, NH) * n_m + [vocab * d, vocab * d, d]
    if slstm:
        tensors += [P["slstm_block"]] * slstm  # approximation: one tensor per sLSTM block
    flat, adam, total = model_state(P, tensors)
    # LM head phase: final norm out, its stats, the bf16 logits chunk (16384 x ld(V)), dh, targets,
    # token loss; the last block's output (head input) is the last layer's x of nothing: + act(d).
    head = act(d) * 3 + cls(16384 * ((vocab + 7) // 8 * 8) * 2) + 3 * cls(rows * 4)
    misc = 32 * MiB + 64 * MiB  # cuBLASLt workspace; grad-clip / partial sums / gate scratch
    fwd_end_peak = acts + head
    bwd_first = acts + act(d) + (bwd_peak if keep == 0 else act(d) + grads + act(p))  # the last block's backward
    peak = flat + adam + misc + max(fwd_end_peak, bwd_first, acts + forward_all - per_layer)
    return dict(preset=preset, B=B, mode=mode, kept=kept, per_layer=per_layer, forward_all=forward_all,
                bwd_peak=bwd_peak, acts=acts, flat=flat, adam=adam, total_params=total, head=head,
                peak=peak, saved=saved, scratch=scratch, misc=misc)


def step_time(B, mode, keep=0, n_m=48, n_s=0, cell_tflops=(163.0, 250.0), gemm_tflops=650.0, tbps=2.2, d=2048,
              p=4096, NH=4, L=128, S=2048, state_share=(0.28, 0.45)):
    """Per-step time saved against model.recompute_blocks (ms; low, high), from counts.

    recompute_blocks runs every block's forward twice; the modes run again only part of the mLSTM
    block's forward and never the sLSTM block's. Per mLSTM layer forward (rows R = B·S):
      GEMMs: up (x_m, z) 4·R·d·p + down 2·R·p·d FLOP at gemm_tflops;
      glue (bytes read + written, bf16, at tbps): LN 4·R·d, conv 4·R·p, q/k/v + gates 10·R·p,
            out-norm 8·R·p;
      cell: 2·MACs, MACs per (head, chunk) = L·dk·dv (state) + (dv/128)·L²·dk/2 (QKᵀ per h slab)
            + 2·L²·dv/2 (P·V, hi + lo) + 2·L·dk·dv (Q̂·C_k, hi + lo), at cell_tflops (low: the
            125m cell's measured 0.91 ms for 148 GFLOP, H100; high: a guess for dk 1024's larger tiles).
    sLSTM layer forward at 1.3b B8: cell 5.3 ms (bench/RESULTS.md, helper slstm), FFN GEMMs
    6·R·d·ffn, scaled linearly in B.
    states: glue's redo with the cell replaced by its gate scan + state_fwd, a share of the cell's
    time between the state kernel's MAC share at dk 1024 (0.28: L·dk·dv of the MACs above) and the
    125m cell's measured time share (0.45: gates 0.03 + state_fwd 0.38 of 0.91 ms, H100), plus the
    per-token copies (den_t + h lo out after the forward and back before the backward: 2 reads +
    2 writes of mlstm_tokens at tbps)."""
    R = B * S
    dk = p // NH
    gemm = 6 * R * d * p / (gemm_tflops * 1e12) * 1e3
    ln, conv, qkv, onorm = (4 * R * d / (tbps * 1e12) * 1e3, 4 * R * p / (tbps * 1e12) * 1e3,
                            10 * R * p / (tbps * 1e12) * 1e3, 8 * R * p / (tbps * 1e12) * 1e3)
    nc = (S + L - 1) // L
    macs = L * dk * dk + (dk // 128) * L * L * dk / 2 + L * L * dk + 2 * L * dk * dk
    cell_flop = 2 * macs * B * NH * nc
    ffn = 64 * math.ceil(1.3 * d / 64)
    slstm = 5.3 * B / 8 + 6 * R * d * ffn / (gemm_tflops * 1e12) * 1e3
    copies = 4 * mlstm_tokens(B, S, NH, dk) / (tbps * 1e12) * 1e3
    out = []
    for rate in cell_tflops:
        for share in state_share:
            cell = cell_flop / (rate * 1e12) * 1e3
            full = gemm + ln + conv + qkv + onorm + cell
            redo = {"block": full, "glue": ln + conv + qkv + onorm + cell, "cell": onorm + cell,
                    "states": ln + conv + qkv + onorm + share * cell + copies}[mode]
            saved = (n_m - keep) * (full - redo) + keep * full + (n_s * slstm if mode != "block" else 0)
            out.append(saved)
    return (min(out), max(out)), cell_flop


def main():
    usable = 79.1 * GiB  # H100 80GB HBM3: ~79.6 GiB total, ~0.5 GiB CUDA context
    print("## Per-layer tensors kept from forward to backward, xlstm-1.3b mLSTM block (class-rounded MiB)\n")
    for B in (4, 8):
        a = account("xlstm[1:0]-1.3b", B, "none")
        print(f"B{B}: saved parts: " + ", ".join(f"{k} {v / MiB:.0f}" for k, v in a["saved"].items()))
        print(f"B{B}: backward scratch {a['scratch'] / MiB:.0f} MiB")
        print("\n| tensor | MiB |\n|---|---|")
        for k, v in a["kept"].items():
            print(f"| {k} | {v / MiB:.1f} |")
        print()
    print("## Step totals (GiB)\n")
    print("| preset | B | mode | model state (flat + AdamW) | kept/layer MiB | activations | block bwd transient | "
          "peak | fits 79.1 GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, slstm in (("xlstm[1:0]-1.3b", 0), ("xlstm[7:1]-1.3b", 6)):
        for B in (4, 8, 16):
            for mode in ("none", "block", "cell", "glue", "states"):
                a = account(preset, B, mode, slstm=slstm)
                print(f"| {preset} | {B} | {mode} | {(a['flat'] + a['adam']) / GiB:.1f} | {a['per_layer'] / MiB:.0f} | "
                      f"{a['acts'] / GiB:.1f} | {a['bwd_peak'] / GiB:.2f} | {a['peak'] / GiB:.1f} | "
                      f"{'yes' if a['peak'] < usable else 'NO'} |")
    a = account("xlstm[1:0]-1.3b", 8, "none")
    print(f"\nparameters (padded): {a['total_params'] / 1e9:.3f} B")
    print("\n## Predicted step time (ms; low-high by the cell's rate) vs model.recompute_blocks, H100\n")
    print("| preset | B | recompute_blocks (measured) | mode | saved per step | predicted step | tokens/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    measured = {("xlstm[1:0]-1.3b", 4): 415.8, ("xlstm[1:0]-1.3b", 8): 800.2, ("xlstm[7:1]-1.3b", 8): 822.8}
    for (preset, B), base in measured.items():
        n_s = 6 if preset.startswith("xlstm[7:1]") else 0
        keeps = (12, 20) if B == 4 else (4, 7)
        for mode, keep in (("glue", 0), ("cell", 0), ("glue", keeps[0]), ("glue", keeps[1]), ("states", 0),
                           ("states", keeps[0])):
            peak = account(preset, B, mode, slstm=n_s, keep=keep)["peak"] / GiB
            (lo, hi), flop = step_time(B, mode, keep, n_m=48 - n_s, n_s=n_s)
            tok = B * 2048
            label = mode + (f":{keep}" if keep else "")
            print(f"| {preset} | {B} | {base} | {label} | {min(lo, hi):.0f}-{max(lo, hi):.0f} | "
                  f"{base - max(lo, hi):.0f}-{base - min(lo, hi):.0f} | "
                  f"{tok / (base - min(lo, hi)) * 1e3 / 1e3:.1f}K-{tok / (base - max(lo, hi)) * 1e3 / 1e3:.1f}K | "
                  f"{peak:.1f}{'' if peak < 79.1 else ' (does not fit)'} |")
    print(f"\n(cell forward FLOP per layer at B8: {step_time(8, 'glue')[1] / 1e9:.0f} G)")


if __name__ == "__main__":
    main()
