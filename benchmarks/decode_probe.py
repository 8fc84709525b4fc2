"""Why decode time depends on the cache's shapes: one-query attention over a cache whose length
changes every call (as in decode) versus a repeated length, per sdpa backend.

    python benchmarks/decode_probe.py
"""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def run(lengths, backend=None, heads=32, kv_heads=8, d=128):
    q = torch.randn(1, heads, 1, d, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, kv_heads, max(lengths), d, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for length in lengths:
        k = kv[:, :, :length]
        if backend is None:
            F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        else:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(lengths) * 1e3


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cudnn sdp enabled: {torch.backends.cuda.cudnn_sdp_enabled()}")
    print("| backend | new length every call (ms) | same length (ms) |")
    print("|---|---|---|")
    for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("math", SDPBackend.MATH)]:
        base = {"default": 1000, "flash": 3000, "efficient": 5000, "cudnn": 7000, "math": 9000}[name]
        try:
            fresh = run(list(range(base, base + 200)), backend)
            same = run([base + 100] * 200, backend)
            print(f"| {name} | {fresh:.3f} | {same:.3f} |")
        except RuntimeError as error:
            print(f"| {name} | error: {str(error)[:60]} | |")


if __name__ == "__main__":
    main()
