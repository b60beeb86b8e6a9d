"""Benchmark the grouped weighted-LoRA backends (``torch``, ``grouped``, ``triton``) on a GPU.

LLaMA-2-7B-like projections (in x out = 4096 x 4096, 4096 x 11008, 11008 x 4096), MixLoRA routing
(E = 8 experts, top-k = 2, r = 16, softmax gate weights), N = 2048 tokens (training) and N = 32, 1
(decode). For every case and backend:

1. correctness against the ``reference`` backend run in float64: relative error
   ``||out - ref|| / ||ref||`` of the forward, and the largest of the same for the gradients of
   x, A, B and the gate weights;
2. time per call (median, ``triton.testing.do_bench`` where Triton is installed, CUDA events
   otherwise) of the forward (``torch.no_grad``: inference) and of forward + backward (training):
   eager calls back to back, so where the GPU work is small this is the host's launch overhead;
3. "GPU" columns: the kernels' own time per call (sum of the CUDA kernels' durations under
   ``torch.profiler``), what the op costs when the host runs ahead (a real model, CUDA graphs).
   ``--kernels`` prints the per-kernel breakdown of each backend too.

Dtypes: ``bf16`` (x, A and B all bf16: the kernels' own speed) and ``fp32`` (what
``LoraWeights.delta`` runs: float32 parameters, x cast to them). A failing backend prints its error
and the others go on. Without a CUDA device the script says so and exits 0.

Usage: ``python benchmarks/kernel_bench.py [--dtypes bf16 fp32] [--backends torch grouped triton]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import traceback

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)
TOKENS = [2048, 32, 1]
E, K, R = 8, 2, 16
SCALING = 2.0
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_case(N, d_in, d_out, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, d_in, device="cuda", generator=g).to(dtype)
    A = (torch.randn(E, R, d_in, device="cuda", generator=g) / d_in**0.5).to(dtype)
    B = (torch.randn(E, d_out, R, device="cuda", generator=g) / R**0.5).to(dtype)
    logits = torch.randn(N, E, device="cuda", generator=g)
    top, idx = logits.topk(K, dim=-1)
    w = top.softmax(-1)  # float32 gate weights, as MixLoRA's router gives
    dy = torch.randn(N, d_out, device="cuda", generator=g).to(dtype)
    return x, A, B, idx, w, dy


def run_once(backend, x, A, B, idx, w, dy):
    """Output and gradients (x, A, B, w) of ``<out, dy>``."""
    from moelora.kernels import weighted_lora

    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, w)]
    out = weighted_lora(*leaves[:3], SCALING, idx, leaves[3], combine=True, backend=backend)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def rel_err(got, want):
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def timer():
    """``f -> median ms``: triton's do_bench (flushes L2 between calls) or CUDA events."""
    try:
        from triton.testing import do_bench

        return lambda f, grad_to_none=None: do_bench(f, warmup=25, rep=100, grad_to_none=grad_to_none,
                                                     return_mode="median")
    except ImportError:
        def bench(f, grad_to_none=None, warmup=10, reps=50):
            for _ in range(warmup):
                f()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                for t in grad_to_none or ():
                    t.grad = None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                f()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        return bench


def gpu_ms(f, grad_to_none=(), reps=20, table=None):
    """Kernel time per call: the CUDA kernels' durations summed by ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            for t in grad_to_none:
                t.grad = None
            f()
        torch.cuda.synchronize()
    events = prof.key_averages()
    if table:
        print(f"    kernels of {table}:")
        print("\n".join("    " + line for line in events.table(sort_by="self_device_time_total", row_limit=12).splitlines()))
    return sum(e.self_device_time_total for e in events) / 1000 / reps


def measure(backend, case, ref, bench, kernels=False):
    """One backend on one case: errors against ``ref``, then forward and forward + backward times."""
    from moelora.kernels import weighted_lora

    x, A, B, idx, w, dy = case
    got = run_once(backend, *case)
    row = {"err_fwd": rel_err(got[0], ref[0]), "err_bwd": max(rel_err(g, r) for g, r in zip(got[1:], ref[1:]))}
    label = f"{backend} {tuple(x.shape)} {x.dtype}" if kernels else None
    with torch.no_grad():
        row["fwd"] = bench(lambda: weighted_lora(x, A, B, SCALING, idx, w, backend=backend))
        row["fwd_gpu"] = gpu_ms(lambda: weighted_lora(x, A, B, SCALING, idx, w, backend=backend),
                                table=label and label + " forward")
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, w)]

    def step():
        weighted_lora(*leaves[:3], SCALING, idx, leaves[3], backend=backend).backward(dy)

    row["fwd_bwd"] = bench(step, grad_to_none=leaves)
    row["fwd_bwd_gpu"] = gpu_ms(step, grad_to_none=leaves, table=label and label + " forward+backward")
    return row


def bench_case(backends, N, d_in, d_out, dtype_name, bench, kernels=False):
    case = make_case(N, d_in, d_out, DTYPES[dtype_name])
    ref = run_once("reference", *(t.double() if t.is_floating_point() else t for t in case))
    rows = []
    for backend in backends:
        try:
            row = measure(backend, case, ref, bench, kernels)
        except Exception as err:  # report, go on with the other backends
            traceback.print_exc(limit=3)
            row = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:200]}
        rows.append({"backend": backend, "case": f"{d_in}x{d_out} N={N} {dtype_name}", **row})
    base = next((r for r in rows if r["backend"] == "torch" and "error" not in r), None)
    for row in rows:
        if "error" in row:
            print(f"  {row['case']:<24} {row['backend']:<8} FAILED: {row['error']}")
            continue
        ratio = (f"{row['fwd'] / base['fwd']:6.2f}x {row['fwd_bwd'] / base['fwd_bwd']:6.2f}x"
                 if base else "     -       -")
        print(f"  {row['case']:<24} {row['backend']:<8} {row['fwd']:7.3f} {row['fwd_bwd']:7.3f}"
              f" {row['fwd_gpu']:8.3f} {row['fwd_bwd_gpu']:8.3f}   {ratio}"
              f"   {row['err_fwd']:8.1e} {row['err_bwd']:8.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "grouped", "triton"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES], help="IN x OUT, e.g. 4096x11008")
    parser.add_argument("--kernels", action="store_true", help="print each backend's per-kernel GPU times")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA device found; this benchmark needs a GPU. Nothing measured.")
        return 0
    from moelora.kernels import BACKENDS, TRITON_IMPORT_ERROR

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}")
    except ImportError:
        print(", no triton")
    if "triton" in args.backends and "triton" not in BACKENDS:
        print(f"note: the triton backend is unavailable ({TRITON_IMPORT_ERROR}); it will fail below")
    print(f"E={E} k={K} r={R}; ms per call: wall (median, eager) and GPU (kernels only); wall ratio to "
          "'torch'; relative error vs the float64 reference")
    print(f"  {'case':<24} {'backend':<8} {'fwd':>7} {'f+b':>7} {'fwd GPU':>8} {'f+b GPU':>8}   "
          f"{'ratio fwd, f+b':<15}   {'err fwd':>8} {'err bwd':>8}")
    bench = timer()
    for dtype_name in args.dtypes:
        for shape in args.shapes:
            d_in, d_out = (int(v) for v in shape.split("x"))
            for N in args.tokens:
                try:
                    bench_case(args.backends, N, d_in, d_out, dtype_name, bench, args.kernels)
                except Exception as err:  # e.g. the reference itself failed: skip the case
                    print(f"  {d_in}x{d_out} N={N} {dtype_name}: case FAILED: {type(err).__name__}: {err}")
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
