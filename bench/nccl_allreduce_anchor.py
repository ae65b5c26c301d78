"""NCCL all-reduce bus bandwidth through PyTorch: the anchor for Gyre's gradient all-reduce.

Run on the device machine with one process per GPU:
    torchrun --standalone --nproc_per_node=N bench/nccl_allreduce_anchor.py [--dtype float32]

Bus bandwidth as nccl-tests defines it for all-reduce: algbw * 2 (n - 1) / n, where algbw =
bytes / time. Time: median of 20 timed calls after 5 warm-up calls, each timed by CUDA events on
rank 0 between two barriers. Printed by rank 0 as a Markdown table.
"""
import argparse
import os
import statistics

import torch
import torch.distributed as dist


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dtype = getattr(torch, args.dtype)
    if rank == 0:
        print(f"| bytes | time ms | algbw GB/s | busbw GB/s |  ({world} GPUs, {args.dtype}, torch {torch.__version__}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))})")
        print("|---|---|---|---|")
    for mib in (1, 8, 64, 256, 1024):
        n = mib * 2**20 // torch.tensor([], dtype=dtype).element_size()
        x = torch.ones(n, dtype=dtype, device="cuda")
        times = []
        for i in range(5 + args.iters):
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(x)
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        algbw = mib * 2**20 / (ms / 1e3) / 1e9
        if rank == 0:
            print(f"| {mib} MiB | {ms:.3f} | {algbw:.1f} | {algbw * 2 * (world - 1) / world:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
