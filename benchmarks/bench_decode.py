"""One NSA decode step against SDPA decoding over the dense model's full KV cache, in the same run.

    python3 benchmarks/bench_decode.py [--contexts 8192 16384 32768 65536] [--batches 1 16] [--json PATH]
                                       [--breakdown]

Configs (bf16): llama-G4 (Hq=32, Hkv=8, D=128) and paper-G16 (Hq=64, Hkv=4, D=128); NSA at the paper's
defaults (l=32, d=16, l'=64, n=16, w=512). Per (config, context T, batch B), one new token per sequence:

- NSA: `ops.nsa_decode(..., backend="triton")` on the raw cache (the dense model's own K/V tensors: shared
  branch k/v), the compressed cache and the gates: the four decode kernels, selection included;
- dense: torch SDPA for that query over the whole cache [B, Hkv, T, D] with enable_gqa, through each
  backend that accepts it (flash, cuDNN, efficient); the fastest is the baseline.

Each is captured in a CUDA graph (so the host's launch cost is left out of both) that calls it once per
input copy, rotating over enough copies that a step never finds its cache in L2; milliseconds are the
median over repeats of CUDA-event-timed replays, divided by the calls. Also reported: the bytes a step must
read at least (dense: the whole cache; NSA: Tc compressed + n·l' selected + w window keys and values per KV
head) and so the memory-access bound on the speed-up, the bytes each cached token costs (measured on an
NSACacheLayer holding 64k tokens, shared and independent branch k/v), and the cost of the incremental
compression (φ on the block a step completes, once every d steps). --breakdown adds each decode kernel's
device time per step at the largest context (profiled eager calls over the same rotated copies).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa_convert import ops
from nsa_convert.nn.cache import NSACacheLayer
from nsa_convert.nn.compression import BlockCompressor
from nsa_convert.spec import SparsityParams, num_compressed_blocks

CONFIGS = {"llama-G4": (32, 8, 128), "paper-G16": (64, 4, 128)}
PARAMS = SparsityParams()
DTYPE = torch.bfloat16
ROTATE_BYTES = 256 * 2**20
"""Copies of the inputs are rotated until each graph touches at least this much (L2 is 50 MB)."""
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def graph_ms(calls, repeats: int = 15) -> float:
    """Median milliseconds per call of `calls` (callables) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    inner = max(1, math.ceil(2.0 / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s): the practical memory ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = graph_ms([lambda: dst.copy_(src)])
    return 2 * src.numel() / ms / 1e9


def nsa_read_bytes(batch: int, seq_len: int, hkv: int, dim: int) -> int:
    """Fewest bytes a step reads: q, gates and out aside, compressed + selected + window K and V."""
    tc = num_compressed_blocks(seq_len, PARAMS.compress_block, PARAMS.compress_stride)
    tokens = tc + min(seq_len, PARAMS.top_n * PARAMS.block_size) + min(seq_len, PARAMS.window)
    return batch * hkv * tokens * 2 * dim * DTYPE.itemsize


def kernel_us(calls, rounds: int = 5) -> dict[str, float]:
    """Device microseconds per call of each kernel the calls launch (eager, profiled)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for call in calls:
                call()
        torch.cuda.synchronize()
    per_call = rounds * len(calls)
    return {e.key: e.device_time_total / per_call for e in prof.key_averages() if e.device_time_total > 0}


def decode_inputs(name: str, batch: int, seq_len: int) -> list[tuple[torch.Tensor, ...]]:
    """Copies of one step's inputs (q, k, v, k_cmp, v_cmp [B, Hkv, T, D], gates, lens), enough of them
    that rotating over them touches ROTATE_BYTES of cache."""
    hq, hkv, dim = CONFIGS[name]
    dense_bytes = batch * hkv * seq_len * 2 * dim * DTYPE.itemsize
    copies = max(1, min(8, math.ceil(ROTATE_BYTES / dense_bytes)))
    tc = num_compressed_blocks(seq_len, PARAMS.compress_block, PARAMS.compress_stride)
    sets = []
    for _ in range(copies):
        kv = [torch.randn(batch, hkv, seq_len, dim, device="cuda", dtype=DTYPE) for _ in range(2)]
        compressed = [torch.randn(batch, hkv, tc, dim, device="cuda", dtype=DTYPE) for _ in range(2)]
        q = torch.randn(batch, 1, hq, dim, device="cuda", dtype=DTYPE)
        gates = torch.rand(batch, 1, hq, 3, device="cuda", dtype=DTYPE)
        lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
        sets.append((q, *kv, *compressed, gates, lens))
    return sets


def bench_one(name: str, batch: int, seq_len: int, breakdown: bool = False) -> dict:
    _, hkv, dim = CONFIGS[name]
    dense_bytes = batch * hkv * seq_len * 2 * dim * DTYPE.itemsize
    sets = decode_inputs(name, batch, seq_len)
    copies = len(sets)

    def nsa_call(q, k, v, k_cmp, v_cmp, gates, lens):
        views = tuple(x.transpose(1, 2) for x in (k, v, k_cmp, v_cmp))
        return lambda: ops.nsa_decode(q, *views, gates, lens, backend="triton")

    def sdpa_call(q, k, v, *_):
        query = q.transpose(1, 2)
        return lambda: F.scaled_dot_product_attention(query, k, v, enable_gqa=True)

    row = {"config": name, "batch": batch, "context": seq_len, "copies": copies}
    row["nsa_ms"] = graph_ms([nsa_call(*s) for s in sets])
    if breakdown:
        row["kernels_us"] = kernel_us([nsa_call(*s) for s in sets])
    dense = {}
    for backend, key in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(key), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the per-backend "not used because" lines
                dense[backend] = graph_ms([sdpa_call(*s) for s in sets])
        except Exception as err:  # a backend that refuses GQA decoding (or graph capture) is skipped
            dense[backend] = None
            row.setdefault("sdpa_errors", {})[backend] = str(err).splitlines()[0][:120]
    row["sdpa_ms"] = dense
    ran = {k: v for k, v in dense.items() if v is not None}
    best = min(ran, key=ran.get)
    row["dense_backend"], row["dense_ms"] = best, ran[best]
    row["speedup"] = row["dense_ms"] / row["nsa_ms"]
    row["bound"] = dense_bytes / nsa_read_bytes(batch, seq_len, hkv, dim)
    row["nsa_tb_s"] = nsa_read_bytes(batch, seq_len, hkv, dim) / row["nsa_ms"] / 1e9
    row["dense_tb_s"] = dense_bytes / row["dense_ms"] / 1e9
    del sets
    torch.cuda.empty_cache()
    return row


def cache_bytes_per_token(name: str, seq_len: int = 65536) -> dict:
    """Bytes per cached token per layer held by an NSACacheLayer after a prefill of seq_len tokens, B = 1."""
    _, hkv, dim = CONFIGS[name]
    dense = 2 * hkv * dim * DTYPE.itemsize
    result = {"dense": dense}
    tc = num_compressed_blocks(seq_len, PARAMS.compress_block, PARAMS.compress_stride)
    for mode, heads in (("shared", hkv), ("independent", 3 * hkv)):
        layer = NSACacheLayer(hkv, mode == "independent", PARAMS)
        kv = torch.randn(1, heads, seq_len, dim, device="cuda", dtype=DTYPE)
        layer.update(kv, kv)
        compressed = torch.randn(1, tc, hkv, dim, device="cuda", dtype=DTYPE)
        layer.start(None, compressed, compressed)
        step = torch.randn(1, heads, 1, dim, device="cuda", dtype=DTYPE)
        layer.update(step, step)
        result[mode] = layer.nbytes() / (seq_len + 1)
        del layer, kv
    return result


def extension_ms(name: str, backend: str, batch: int = 16, seq_len: int = 8192) -> float:
    """One step's incremental compression when every sequence completes a block (once every d steps), by
    the fused Triton kernel or the reference (gathered blocks through the φ modules, eager)."""
    _, hkv, dim = CONFIGS[name]
    layer = NSACacheLayer(hkv, False, PARAMS)
    kv = torch.randn(batch, hkv, seq_len - 1, dim, device="cuda", dtype=DTYPE)
    tc = num_compressed_blocks(seq_len - 1, PARAMS.compress_block, PARAMS.compress_stride)
    layer.update(kv, kv)
    compressed = torch.randn(batch, tc, hkv, dim, device="cuda", dtype=DTYPE)
    layer.start(None, compressed, compressed)
    step = torch.randn(batch, hkv, 1, dim, device="cuda", dtype=DTYPE)
    layer.update(step, step)
    phi = [
        BlockCompressor(dim, PARAMS.compress_block, PARAMS.compress_stride).to("cuda", DTYPE)
        for _ in range(2)
    ]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        layer.past_length = seq_len - 1
        start.record()
        layer.extend_compressed(*phi, backend)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[65536, 32768, 16384, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--json", default=None)
    parser.add_argument("--breakdown", action="store_true", help="per-kernel times at the largest context")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    per_token = {name: cache_bytes_per_token(name) for name in CONFIGS}
    extension = {name: {b: extension_ms(name, b) for b in ("triton", "reference")} for name in CONFIGS}
    print(f"copy {bandwidth:.2f} TB/s; bytes/token {per_token}; φ ms {extension}", flush=True)
    rows = []
    for seq_len in args.contexts:
        for batch in args.batches:
            for name in CONFIGS:
                try:
                    breakdown = args.breakdown and seq_len == max(args.contexts)
                    rows.append(bench_one(name, batch, seq_len, breakdown))
                except Exception as err:  # keep the other rows of a one-shot run
                    print(f"{name} B={batch} T={seq_len}: FAILED {type(err).__name__}: {err}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                r = rows[-1]
                print(
                    f"{name} B={batch} T={seq_len}: nsa {r['nsa_ms']:.4f} ms, dense {r['dense_ms']:.4f} ms "
                    f"({r['dense_backend']}) {r['speedup']:.2f}x (bound {r['bound']:.1f}x) {r['sdpa_ms']}",
                    flush=True,
                )
                if "kernels_us" in r:
                    print(
                        "    " + ", ".join(f"{k[:40]} {v:.1f} us" for k, v in r["kernels_us"].items()),
                        flush=True,
                    )
    summary = {
        "device": device,
        "torch": torch.__version__,
        "copy_tb_s": bandwidth,
        "rows": rows,
        "cache_bytes_per_token": per_token,
        "extension_ms_b16": extension,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print(f"\n{device}, torch {torch.__version__}; device-to-device copy {bandwidth:.2f} TB/s (read + write)")
    print("\n| config | B | T | NSA ms | dense ms (backend) | dense / NSA | bound | NSA TB/s | dense TB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['batch']} | {r['context'] // 1024}k | {r['nsa_ms']:.4f} | {r['dense_ms']:.4f} "
            f"({r['dense_backend']}) | {r['speedup']:.2f}× | {r['bound']:.1f}× | {r['nsa_tb_s']:.2f} | "
            f"{r['dense_tb_s']:.2f} |"
        )
    print(
        "\n| config | dense B/token/layer | NSA shared | NSA independent | "
        "φ per completed block, B=16, Triton / reference (ms) |"
    )
    print("|---|---|---|---|---|")
    for name in CONFIGS:
        t = per_token[name]
        print(
            f"| {name} | {t['dense']} | {t['shared']:.1f} ({t['shared'] / t['dense']:.4f}×) | "
            f"{t['independent']:.1f} ({t['independent'] / t['dense']:.4f}×) | "
            f"{extension[name]['triton']:.4f} / {extension[name]['reference']:.3f} |"
        )


if __name__ == "__main__":
    main()
