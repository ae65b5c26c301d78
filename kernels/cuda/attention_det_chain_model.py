# Discrete-event count of the deterministic dQ chain (attn11 notes). Key block j of a
# (batch, kv head) pair has query tiles m = 2j .. M-1 (M = T/64). Grouped launch order onto P SMs
# (one block per SM, in-order dispatch), shortest first for the deterministic forms. Consumer
# time per tile tau (both warpgroups together); a writer's contribution takes delta (turn poll +
# bulk read + completion + release) and starts when the tile is staged, the writer is free and
# the previous contribution in the tile's order is done; a consumer reuses a staging slot only
# after its writer finished the contribution staged there `stages` tiles ago.
#   pair:    detdq's D 64 form, deleted in session 9 (cattn): two contributions per block and
#            tile (wg1, then wg0), one writer each; kept here as the model's calibration (its
#            measured +29% gives delta ~ 1.4 us)
#   presum1: one contribution per block and tile, one writer (never built)
#   presum2: one contribution per block and tile, two writers taking alternate tiles: the D 64
#            kernel (attention_bwd_det_presum.cu; whole backward measured +5-7%, H100)
#   none:    the default kernel (no chain; longest first)
import heapq
def run(mode, tau, delta, T=2048, pairs=192, head_group=16, P=132, stages=2):
    M = T // 64; J = T // 128
    order = []
    for g0 in range(0, pairs, head_group):
        grp = list(range(g0, min(pairs, g0 + head_group)))
        for rank in range(J):
            for pr in grp:
                order.append((pr, rank if mode == 'none' else J - 1 - rank))
    chain_done = {}
    sms = [0.0] * P
    heapq.heapify(sms)
    finish = 0.0
    for pr, j in order:
        t0 = heapq.heappop(sms)
        tiles = list(range(2 * j, M))
        cons = t0
        if mode == 'none':
            end = t0 + tau * len(tiles)
        else:
            nwriters = 2 if mode in ('pair', 'presum2') else 1
            wfree = [t0] * nwriters
            slot_done = {}  # (stream, i) -> done time of the contribution of tile i in that stream
            for i, m in enumerate(tiles):
                streams = [1, 0] if mode == 'pair' else [0]
                for sidx in streams:
                    if i >= stages: cons = max(cons, slot_done[(sidx, i - stages)])
                cons += tau
                for sidx in streams:
                    if mode == 'pair':
                        k = 2 * (m // 2 - j) + (1 - sidx); w = sidx
                    else:
                        k = m // 2 - j; w = i % nwriters
                    prev = chain_done.get((pr, m, k - 1), 0.0) if k > 0 else 0.0
                    start = max(cons, wfree[w], prev)
                    done = start + delta
                    chain_done[(pr, m, k)] = done
                    wfree[w] = done
                    slot_done[(sidx, i)] = done
            end = max([cons] + wfree)
        finish = max(finish, end)
        heapq.heappush(sms, end)
    return finish
for tau, label, pairs, hg, T in [(2.0, 'D64 B16 S2048 H12, tau 2.0 us', 192, 16, 2048),
                                 (3.2, 'D128 B8 S2048 H16, tau 3.2 us', 128, 8, 2048)]:
    base = run('none', tau, 0.0, T, pairs, hg)
    for delta in (1.5, 2.0, 2.5, 3.0, 4.0):
        r = {m: run(m, tau, delta, T, pairs, hg) for m in ('pair', 'presum1', 'presum2')}
        print(f'{label} delta {delta}: default {base:.0f} us; ' +
              ', '.join(f'{m} {v:.0f} (+{100 * (v / base - 1):.1f}%)' for m, v in r.items()))
