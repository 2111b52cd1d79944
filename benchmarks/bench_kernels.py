"""Benchmark the Triton kernels against their best torch peers, in one run, with ratios.

On a CUDA device: GB/s of FP8 quantization and MLA decode as a fraction of the device's copy bandwidth
(measured here) and of its nominal bandwidth (when the device is known); TFLOPS of the block-scaled FP8 GEMM vs
`torch._scaled_mm` with rowwise scales and bf16 `torch.matmul`; fused MoE vs a per-expert loop and
`torch._grouped_mm` (when this torch has it). Medians of `triton.testing.do_bench`.

On CPU the kernels cannot be compiled; it times the plain-torch references on small shapes and says so.

    python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

NOMINAL_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0}  # HBM, TB/s


def _median_ms_cpu(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _median_ms_gpu(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def run_cpu() -> None:
    """References on small shapes: what the torch backend costs here; the kernels' figures need a GPU."""
    from workbench_kernels.reference import (
        act_quant_ref,
        fp8_gemm_ref,
        fused_moe_ref,
        mla_decode_ref,
        moe_gate_ref,
        weight_dequant_ref,
        weight_quant_ref,
    )

    torch.manual_seed(0)
    x = torch.randn(256, 2048, dtype=torch.bfloat16)
    w = torch.randn(1024, 2048) * 0.02
    xq, xs = act_quant_ref(x)
    wq, ws = weight_quant_ref(w)
    logits = torch.randn(256, 64)
    E, H, I, T, k = 16, 512, 256, 128, 4
    experts = [torch.randn(E, I, H, dtype=torch.bfloat16) * 0.05, torch.randn(E, I, H, dtype=torch.bfloat16) * 0.05,
               torch.randn(E, H, I, dtype=torch.bfloat16) * 0.05]
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    route_w = torch.rand(T, k)
    xm = torch.randn(T, H, dtype=torch.bfloat16)
    B, nH, C, R, S = 4, 16, 512, 64, 1024
    mla = (torch.randn(B, nH, C), torch.randn(B, nH, R), torch.randn(B, S, C), torch.randn(B, S, R),
           torch.full((B,), S))
    cases: list[tuple[str, str, Callable[[], object]]] = [
        ("act_quant_ref", "x [256, 2048] bf16", lambda: act_quant_ref(x)),
        ("weight_dequant_ref", "w [1024, 2048]", lambda: weight_dequant_ref(wq, ws)),
        ("fp8_gemm_ref", "256 x 1024 x 2048", lambda: fp8_gemm_ref(xq, xs, wq, ws)),
        ("moe_gate_ref", "[256, 64] noaux_tc", lambda: moe_gate_ref(logits, top_k=6, n_group=8, topk_group=3,
                                                                     scoring_func="sigmoid", topk_method="noaux_tc")),
        ("fused_moe_ref", f"T={T} H={H} I={I} E={E} k={k}", lambda: fused_moe_ref(xm, *experts, ids, route_w)),
        ("mla_decode_ref", f"B={B} nH={nH} C={C} S={S}", lambda: mla_decode_ref(*mla, softmax_scale=0.07)),
    ]
    rows = [[name, shape, f"{_median_ms_cpu(fn):.2f}"] for name, shape, fn in cases]
    _table("CPU: torch references (median of 5)", ["op", "shape", "ms"], rows)
    print("\nNo CUDA device: kernel GB/s and TFLOPS, and their ratios to torch peers, need a GPU.")


def run_gpu() -> None:
    from workbench_kernels.fp8_gemm import fp8_gemm
    from workbench_kernels.fp8_quant import act_quant, weight_dequant, weight_quant
    from workbench_kernels.fused_moe import fused_moe
    from workbench_kernels.mla_decode import mla_decode

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    bench = _median_ms_gpu
    torch.manual_seed(0)

    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_tbps = 2 * big.numel() / (bench(lambda: big.clone()) * 1e-3) / 1e12
    nominal = next((v for key, v in NOMINAL_TBPS.items() if key in name), None)
    print(f"device: {name}; copy bandwidth {copy_tbps:.2f} TB/s; nominal {nominal or '?'} TB/s")

    def bw_row(op: str, shape: str, nbytes: float, ms: float) -> list[str]:
        tbps = nbytes / (ms * 1e-3) / 1e12
        frac = f"{tbps / nominal:.0%}" if nominal else "?"
        return [op, shape, f"{ms * 1e3:.1f}", f"{tbps * 1e3:.0f}", f"{tbps / copy_tbps:.0%}", frac]

    rows = []
    x = torch.randn(4096, 7168, dtype=torch.bfloat16, device=dev)
    rows.append(bw_row("act_quant", "[4096, 7168] bf16", x.numel() * 3 + x.numel() / 32, bench(lambda: act_quant(x))))
    w = torch.randn(7168, 7168, dtype=torch.bfloat16, device=dev) * 0.02
    wq, ws = weight_quant(w)
    rows.append(bw_row("weight_dequant", "[7168, 7168] -> bf16", w.numel() * 3,
                       bench(lambda: weight_dequant(wq, ws, out_dtype=torch.bfloat16))))
    B, nH, C, R, S = 64, 128, 512, 64, 4096
    mla = (torch.randn(B, nH, C, dtype=torch.bfloat16, device=dev), torch.randn(B, nH, R, dtype=torch.bfloat16, device=dev),
           torch.randn(B, S, C, dtype=torch.bfloat16, device=dev), torch.randn(B, S, R, dtype=torch.bfloat16, device=dev),
           torch.full((B,), S, device=dev))
    rows.append(bw_row("mla_decode", f"B={B} nH={nH} S={S} bf16", B * S * (C + R) * 2,
                       bench(lambda: mla_decode(*mla, softmax_scale=0.07))))
    _table("Memory-bound kernels", ["op", "shape", "us", "GB/s", "of copy", "of nominal"], rows)

    rows = []
    for M, N, K in [(64, 7168, 7168), (4096, 7168, 7168), (4096, 2112, 7168)]:
        flop = 2 * M * N * K
        xb = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
        wb = torch.randn(N, K, dtype=torch.bfloat16, device=dev) * 0.02
        xq, xs = act_quant(xb)
        wq, ws = weight_quant(wb)
        t_ours = bench(lambda: fp8_gemm(xq, xs, wq, ws))  # noqa: B023  (timed before the next iteration)
        t_bf16 = bench(lambda: xb @ wb.T)  # noqa: B023
        x8 = xb.to(torch.float8_e4m3fn)
        w8 = wb.to(torch.float8_e4m3fn)
        one_m = torch.ones(M, 1, device=dev)
        one_n = torch.ones(1, N, device=dev)
        try:
            t_scaled = bench(lambda: torch._scaled_mm(x8, w8.T, one_m, one_n, out_dtype=torch.bfloat16))  # noqa: B023
        except RuntimeError as err:
            print(f"torch._scaled_mm rowwise unavailable: {err}")
            t_scaled = float("nan")
        tf = [flop / (t * 1e-3) / 1e12 for t in (t_ours, t_scaled, t_bf16)]
        rows.append([f"{M}x{N}x{K}", f"{tf[0]:.0f}", f"{tf[1]:.0f}", f"{tf[2]:.0f}", f"{t_scaled / t_ours:.2f}",
                     f"{t_bf16 / t_ours:.2f}"])
    _table("FP8 GEMM, TFLOPS (ours: 1x128 x 128x128 block scales)",
           ["M x N x K", "ours", "_scaled_mm rowwise", "bf16 matmul", "x vs scaled_mm", "x vs bf16"], rows)

    T, H, I, E, k = 4096, 2048, 1408, 64, 6  # DeepSeek-V2-Lite experts
    x = torch.randn(T, H, dtype=torch.bfloat16, device=dev)
    wg = torch.randn(E, I, H, dtype=torch.bfloat16, device=dev) * H ** -0.5
    wu = torch.randn(E, I, H, dtype=torch.bfloat16, device=dev) * H ** -0.5
    wd = torch.randn(E, H, I, dtype=torch.bfloat16, device=dev) * I ** -0.5
    ids = torch.topk(torch.randn(T, E, device=dev), k).indices
    rw = torch.rand(T, k, device=dev)

    def expert_loop() -> torch.Tensor:
        out = torch.zeros(T, H, dtype=torch.float32, device=dev)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            xe = x[tok]
            h = F.silu(xe @ wg[e].T) * (xe @ wu[e].T)
            out.index_add_(0, tok, (h @ wd[e].T).float() * rw[tok, slot, None])
        return out.to(x.dtype)

    flop = 2 * T * k * 3 * H * I
    rows = []
    t_ours = bench(lambda: fused_moe(x, wg, wu, wd, ids, rw))
    t_loop = bench(expert_loop)
    rows.append(["fused_moe (ours)", f"{flop / t_ours / 1e9:.0f}", f"{t_ours:.2f}", "1.00"])
    rows.append(["per-expert loop", f"{flop / t_loop / 1e9:.0f}", f"{t_loop:.2f}", f"{t_loop / t_ours:.2f}"])
    if hasattr(torch, "_grouped_mm"):
        order = torch.argsort(ids.flatten(), stable=True)
        offs = torch.cumsum(torch.bincount(ids.flatten(), minlength=E), 0).to(torch.int32)
        wgu_t = torch.cat([wg, wu], dim=1).transpose(1, 2)  # [E, H, 2I]
        wd_t = wd.transpose(1, 2)  # [E, I, H]

        def grouped() -> torch.Tensor:
            xs_sorted = x[order // k]
            gu = torch._grouped_mm(xs_sorted, wgu_t, offs=offs)
            h = F.silu(gu[:, :I]) * gu[:, I:]
            y = torch._grouped_mm(h, wd_t, offs=offs).float() * rw.flatten()[order, None]
            return torch.zeros(T, H, device=dev).index_add_(0, order // k, y).to(x.dtype)

        try:
            t_grouped = bench(grouped)
            rows.append(["torch._grouped_mm", f"{flop / t_grouped / 1e9:.0f}", f"{t_grouped:.2f}",
                         f"{t_grouped / t_ours:.2f}"])
        except RuntimeError as err:
            print(f"torch._grouped_mm failed: {err}")
    _table(f"Fused MoE bf16, T={T} H={H} I={I} E={E} k={k}", ["impl", "TFLOPS", "ms", "time / ours"], rows)


if __name__ == "__main__":
    if torch.cuda.is_available():
        run_gpu()
    else:
        run_cpu()
