"""The grouped weighted-LoRA op: every backend equals the reference loop, values and gradients."""

import pytest
import torch

from moelora.kernels import BACKENDS, weighted_lora


def _case(N=13, E=4, k=2, r=3, d_in=10, d_out=7, per_slot=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((N, k, d_in) if per_slot else (N, d_in), generator=g, dtype=dtype)
    A = torch.randn(E, r, d_in, generator=g, dtype=dtype)
    B = torch.randn(E, d_out, r, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    w = torch.rand(N, k, generator=g, dtype=dtype)
    return x, A, B, idx, w


def _explicit(x, A, B, s, idx, w, combine):
    """The equation itself, one assignment at a time."""
    N, k = idx.shape
    out = torch.zeros(N, k, B.shape[1], dtype=x.dtype)
    for n in range(N):
        for j in range(k):
            xj = x[n] if x.dim() == 2 else x[n, j]
            wj = 1.0 if w is None else w[n, j]
            out[n, j] = wj * s * B[idx[n, j]] @ (A[idx[n, j]] @ xj)
    return out.sum(1) if combine else out


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("combine", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_backends_match_the_equation(backend, per_slot, combine, weighted):
    x, A, B, idx, w = _case(per_slot=per_slot)
    w = w if weighted else None
    got = weighted_lora(x, A, B, 0.5, idx, w, combine=combine, backend=backend)
    torch.testing.assert_close(got, _explicit(x, A, B, 0.5, idx, w, combine))


@pytest.mark.parametrize("per_slot", [False, True])
def test_gradients_equal_reference(per_slot):
    x, A, B, idx, w = _case(per_slot=per_slot)
    grads = {}
    for backend in sorted(BACKENDS):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, w)]
        out = weighted_lora(leaves[0], leaves[1], leaves[2], 2.0, idx, leaves[3], combine=True, backend=backend)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for backend in BACKENDS:
        for a, b in zip(grads["reference"], grads[backend]):
            torch.testing.assert_close(a, b)


def test_single_lora_fast_path_with_row_weights():
    x, A, B, _, _ = _case(E=1, k=1)
    w = torch.rand(x.shape[0], 1, dtype=x.dtype)
    got = weighted_lora(x, A, B, 1.5, None, w, backend="torch")
    want = w * 1.5 * (x @ A[0].T @ B[0].T)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(weighted_lora(x, A, B, 1.5, None, w, backend="reference"), want)


def test_unknown_backend_is_named():
    x, A, B, idx, w = _case()
    with pytest.raises(ValueError, match="unknown LoRA kernel backend 'cuda-magic'"):
        weighted_lora(x, A, B, 1.0, idx, w, backend="cuda-magic")


def test_default_backend_by_device():
    from moelora.kernels import default_backend

    assert default_backend(torch.device("cpu")) == "grouped"
    assert default_backend(torch.device("cuda", 0)) == "torch"


def test_grouped_handles_experts_with_no_tokens():
    x, A, B, _, w = _case(N=5, E=6, k=2)
    idx = torch.tensor([[0, 5]] * 5)  # experts 1..4 get nothing
    got = weighted_lora(x, A, B, 1.0, idx, w, backend="grouped")
    torch.testing.assert_close(got, _explicit(x, A, B, 1.0, idx, w, True))
