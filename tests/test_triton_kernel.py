"""The fused Triton backend equals the reference loop, values and gradients (x, A, B, weights).

Without a GPU the kernels run on CPU tensors through Triton's interpreter (slow: the shapes are
small). Skipped where Triton is not installed (CI); the "Triton missing" test runs everywhere.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported: its jit then interprets
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moelora  # noqa: E402
import moelora.kernels as kernels  # noqa: E402
from moelora.kernels import BACKENDS, weighted_lora  # noqa: E402

needs_triton = pytest.mark.skipif(
    "triton" not in BACKENDS, reason=f"triton backend not available ({kernels.TRITON_IMPORT_ERROR})"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_problem() -> str | None:
    if DEVICE == "cuda" or "triton" not in BACKENDS:
        return None
    try:
        kernels.triton_kernel._check_interpreter()
    except RuntimeError as err:
        return str(err)
    return None


if _interpreter_problem():  # an environment limit, not a bug of ours: skip the CPU runs
    needs_triton = pytest.mark.skip(reason=_interpreter_problem())


def _case(N, E, k, r, d_in=48, d_out=80, per_slot=False, empty_expert=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((N, k, d_in) if per_slot else (N, d_in), generator=g, dtype=dtype)
    A = torch.randn(E, r, d_in, generator=g, dtype=dtype) / d_in**0.5
    B = torch.randn(E, d_out, r, generator=g, dtype=dtype) / r**0.5
    experts = [e for e in range(E) if e != empty_expert]
    idx = torch.stack([torch.tensor(experts)[torch.randperm(len(experts), generator=g)[:k]] for _ in range(N)])
    w = torch.rand(N, k, generator=g, dtype=dtype) + 0.5
    return x, A, B, idx, w


def _run(backend, x, A, B, s, idx, w, combine):
    """Output and the gradients of a random projection of it, wrt x, A, B and (if given) weights."""
    leaves = [t.to(DEVICE).clone().requires_grad_() for t in (x, A, B)]
    wl = None if w is None else w.to(DEVICE).clone().requires_grad_()
    idx = None if idx is None else idx.to(DEVICE)
    out = weighted_lora(*leaves, s, idx, wl, combine=combine, backend=backend)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(DEVICE)
    (out * proj).sum().backward()
    grads = [t.grad for t in leaves] + ([] if wl is None else [wl.grad])
    return [out.detach()] + grads


def _check(x, A, B, s, idx, w, combine, rtol=1e-4, atol=1e-4):
    want = _run("reference", x, A, B, s, idx, w, combine)
    got = _run("triton", x, A, B, s, idx, w, combine)
    for name, a, b in zip(["out", "dx", "dA", "dB", "dw"], want, got):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@needs_triton
@pytest.mark.parametrize(
    "per_slot,k,combine,r",
    [(False, 1, True, 8), (False, 2, True, 16), (False, 2, False, 8), (True, 1, False, 16),
     (True, 2, True, 8), (True, 2, False, 16)],
)
def test_routed_experts_match_reference(per_slot, k, combine, r):
    """E = 8, odd sizes (N=37, in=48, out=80), weighted, expert 3 receives no rows."""
    x, A, B, idx, w = _case(N=37, E=8, k=k, r=r, per_slot=per_slot, empty_expert=3)
    _check(x, A, B, 0.5, idx, w, combine)


@needs_triton
@pytest.mark.parametrize("combine", [True, False])
def test_unweighted_routing(combine):
    x, A, B, idx, _ = _case(N=37, E=8, k=2, r=16, empty_expert=0)
    _check(x, A, B, 2.0, idx, None, combine)


@needs_triton
@pytest.mark.parametrize("per_slot,weighted,combine", [(False, True, True), (False, False, False), (True, True, False)])
def test_single_lora_without_indices(per_slot, weighted, combine):
    """E = 1, indices None: plain LoRA (2-D x), or every slot of a 3-D x on expert 0."""
    x, A, B, _, w = _case(N=37, E=1, k=2 if per_slot else 1, r=8, per_slot=per_slot)
    w = w if weighted else None
    got = _run("triton", x, A, B, 1.5, None, w, combine)
    if per_slot:  # the reference reads indices None as k = 1: spell the k slots out for it
        want = _run("reference", x, A, B, 1.5, torch.zeros(x.shape[:2], dtype=torch.long), w, combine)
    else:
        want = _run("reference", x, A, B, 1.5, None, w, combine)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@needs_triton
def test_few_rows_split_reduction():
    """A decode-sized call: few row blocks, so the shrink splits the reduction (atomic adds)."""
    x, A, B, idx, w = _case(N=3, E=8, k=2, r=16, d_in=80, d_out=48)
    _check(x, A, B, 0.5, idx, w, True)


@needs_triton
def test_float64_is_exact():
    x, A, B, idx, w = _case(N=13, E=4, k=2, r=8, d_in=10, d_out=7, dtype=torch.float64)
    _check(x, A, B, 0.5, idx, w, True, rtol=1e-10, atol=1e-10)


@needs_triton
@pytest.mark.parametrize("M,E", [(74, 8), (3, 8), (40, 1), (200, 5), (300, 40)])
def test_layout_kernel_equals_torch_layout(M, E):
    """The one-program layout kernel (used on GPUs) builds the same blocks as the torch fallback."""
    from moelora.kernels import triton_kernel as tk

    if not (torch.cuda.is_available() or tk._INTERPRET_ALL):
        pytest.skip("the layout kernel needs a GPU or TRITON_INTERPRET=1 set before triton was imported")
    flat = torch.randint(0, E, (M,), generator=torch.Generator().manual_seed(M))
    flat[flat == 2] = 3  # expert 2 gets no rows
    cfg = tk._Config(torch.device(DEVICE), M, E, 16, torch.float32)
    got = tk._layout(flat.to(DEVICE), E, cfg)
    want = tk._layout_torch(flat, E, cfg)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b)


@needs_triton
def test_mixed_dtypes_are_refused():
    x, A, B, idx, w = _case(N=4, E=2, k=1, r=8)
    with pytest.raises(TypeError, match="one dtype"):
        weighted_lora(x.double(), A, B, 1.0, idx, w, backend="triton")


def test_absent_without_triton(monkeypatch):
    """Where ``import triton`` fails the package still imports, and asking for the backend says why."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "moelora.kernels.triton_kernel", raising=False)
    monkeypatch.delitem(sys.modules, "moelora.kernels")
    monkeypatch.setattr(moelora, "kernels", kernels)  # the re-import rebinds it; restored afterwards
    fresh = importlib.import_module("moelora.kernels")
    assert fresh is not kernels
    assert "triton" not in fresh.BACKENDS
    assert {"reference", "torch", "grouped"} <= set(fresh.BACKENDS)
    x, A, B, idx, w = _case(N=4, E=2, k=1, r=8)
    torch.testing.assert_close(fresh.weighted_lora(x, A, B, 1.0, idx, w, backend="grouped"),
                               fresh.weighted_lora(x, A, B, 1.0, idx, w, backend="reference"))
    with pytest.raises(RuntimeError, match="'triton' is unavailable: the triton package failed to import"):
        fresh.weighted_lora(x, A, B, 1.0, idx, w, backend="triton")
