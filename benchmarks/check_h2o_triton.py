"""CUDA: the Triton heavy-hitter scores against the plain-torch blockwise reference, and their speed.

    python benchmarks/check_h2o_triton.py
"""

import statistics

import torch

from ntkkv.ops.h2o_scores import heavy_hitter_scores
from ntkkv.policies import H2O, SelectionInputs


def timed(fn, repeats=5):
    times = []
    for _ in range(repeats + 1):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times[1:])


def main():
    print(f"device: {torch.cuda.get_device_name()}")
    print("| batch | heads/kv | n | d | max rel err | same top-k | torch ms | triton ms |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, heads, kv_heads, n, d, pad in [(2, 9, 3, 1500, 64, 300), (1, 32, 8, 4096, 128, 0),
                                             (1, 32, 8, 8192, 128, 0), (1, 32, 8, 32768, 128, 0)]:
        generator = torch.Generator(device="cuda").manual_seed(0)
        queries = torch.randn(batch, heads, n, d, device="cuda", generator=generator, dtype=torch.bfloat16) * 2
        keys = torch.randn(batch, kv_heads, n, d, device="cuda", generator=generator, dtype=torch.bfloat16) * 2
        valid = torch.ones(batch, n, dtype=torch.bool, device="cuda")
        valid[-1, :pad] = False
        inputs = SelectionInputs(queries.view(batch, kv_heads, heads // kv_heads, n, d), keys, keys, valid, d**-0.5)
        fast = heavy_hitter_scores(queries, keys, valid, d**-0.5).view(batch, kv_heads, -1, n)
        method = H2O(max_capacity_prompt=1024)
        slow = method.blockwise_scores(inputs)
        error = ((fast - slow).abs().max() / slow.abs().max()).item()
        same = torch.equal(fast.mean(2).topk(256, dim=-1).indices.sort(-1).values,
                           slow.mean(2).topk(256, dim=-1).indices.sort(-1).values)
        torch_ms = timed(lambda: method.blockwise_scores(inputs), repeats=2 if n > 8192 else 5)
        triton_ms = timed(lambda: heavy_hitter_scores(queries, keys, valid, d**-0.5))
        print(f"| {batch} | {heads}/{kv_heads} | {n} | {d} | {error:.1e} | {same} | {torch_ms:.1f} | {triton_ms:.2f} |")


if __name__ == "__main__":
    main()
