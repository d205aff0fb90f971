"""The C decode kernels against torch's ops: values, gradients, threads, fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from clt_lens.clt import cpu_kernels
from clt_lens.clt.sparse import Support, sparse_decode, sparse_decode_with_norms

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")


@pytest.fixture(scope="module")
def kernels():
    if cpu_kernels.library() is None:
        pytest.skip("the CPU decode kernels did not build (needs a C compiler: gcc or cc)")
    return cpu_kernels


def _case(n_layers=4, batch=37, n_features=53, d=20, density=0.08, zero_fraction=0.3,
          dtype=torch.float32, seed=0):  # fmt: skip
    """Kept positions with zeros among them (JumpReLU's window), a source layer with nothing
    kept and features kept nowhere; d not a multiple of the kernels' vector width."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_layers, batch, n_features, generator=g) < density
    mask[1] = False
    mask[:, :, :5] = False
    support = Support.from_mask(mask)
    values = torch.rand(support.nnz, generator=g, dtype=torch.float64) + 0.5
    values[torch.rand(support.nnz, generator=g) < zero_fraction] = 0
    w_dec = [torch.randn(n_features, n_layers - i, d, generator=g, dtype=torch.float64)
             for i in range(n_layers)]  # fmt: skip
    grad_out = torch.randn(batch, n_layers, d, generator=g, dtype=torch.float64)
    grad_norms = torch.randn(n_layers, n_features, generator=g, dtype=torch.float64)
    cast = [t.to(dtype) for t in (values, grad_out, grad_norms)]
    return support, cast[0], [w.to(dtype) for w in w_dec], cast[1], cast[2]


def _run(use_kernels, support, values, w_dec, grad_out, grad_norms, need_w=None):
    old = cpu_kernels.set_enabled(use_kernels)
    try:
        v = values.clone().requires_grad_()
        need_w = need_w or [True] * len(w_dec)
        ws = [w.clone().requires_grad_(n) for w, n in zip(w_dec, need_w)]
        out, norms = sparse_decode_with_norms(support, v, ws)
        torch.autograd.backward([out, norms], [grad_out, grad_norms])
        return out.detach(), norms.detach(), v.grad, [w.grad for w in ws]
    finally:
        cpu_kernels.set_enabled(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_equal_torch_ops(kernels, dtype, threads, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "PARALLEL_WORK", 0)  # threads even for this small case
    case = _case(dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run(True, *case)
    finally:
        torch.set_num_threads(before)
    want = _run(False, *case)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, **tol)
    for g, w in zip(got[3], want[3]):
        torch.testing.assert_close(g, w, **tol)


def test_kernels_are_what_the_cpu_float32_step_runs(kernels, monkeypatch):
    calls = []
    for name in ("decode_forward", "decode_backward"):
        real = getattr(cpu_kernels, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(cpu_kernels, name, spy)
    support, values, w_dec, grad_out, grad_norms = _case()
    _run(True, support, values, w_dec, grad_out, grad_norms)
    assert calls == ["decode_forward", "decode_backward"]
    calls.clear()
    _run(True, support, values.to(torch.bfloat16), w_dec, grad_out, grad_norms)  # autocast
    assert calls == ["decode_forward", "decode_backward"]  # values are taken to W's dtype
    calls.clear()
    with pytest.MonkeyPatch.context() as m:
        m.setenv(cpu_kernels.ENV_SWITCH, "0")
        _run(True, support, values, w_dec, grad_out, grad_norms)
    assert calls == []


def test_partial_gradients_and_gradcheck(kernels):
    """Only some decoders (or not the values) need gradients; gradcheck in float64."""
    support, values, w_dec, grad_out, grad_norms = _case(n_layers=3, batch=6, n_features=7,
                                                         d=3, density=0.3,
                                                         dtype=torch.float64)  # fmt: skip
    need = [True, False, True]
    got = _run(True, support, values, w_dec, grad_out, grad_norms, need_w=need)
    want = _run(False, support, values, w_dec, grad_out, grad_norms, need_w=need)
    assert got[3][1] is None
    torch.testing.assert_close(got[3][0], want[3][0])
    torch.testing.assert_close(got[2], want[2])
    ws = [w.clone().requires_grad_() for w in w_dec]
    out = sparse_decode(support, values, ws)  # values need no gradient here
    out.backward(grad_out)
    ws_ref = [w.clone().requires_grad_() for w in w_dec]
    old = cpu_kernels.set_enabled(False)
    try:
        sparse_decode(support, values, ws_ref).backward(grad_out)
    finally:
        cpu_kernels.set_enabled(old)
    for a, b in zip(ws, ws_ref):
        torch.testing.assert_close(a.grad, b.grad)
    v = values.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v_, *w: sparse_decode_with_norms(support, v_, list(w)),
        (v, *[w.clone().requires_grad_() for w in w_dec]), fast_mode=True,
    )


def test_results_are_bitwise_independent_of_threads(kernels, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "PARALLEL_WORK", 0)
    case = _case(n_layers=3, batch=64, n_features=96, d=32, density=0.1)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(_run(True, *case))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
        assert torch.equal(other[2], results[0][2])
        assert all(torch.equal(a, b) for a, b in zip(other[3], results[0][3]))


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    support, values, w_dec, grad_out, grad_norms = _case()
    with pytest.warns(UserWarning, match="CPU decode kernels unavailable.*no C compiler"):
        got = _run(True, support, values, w_dec, grad_out, grad_norms)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not once per call
        assert not cpu_kernels.applies(values, *w_dec)
    want = _run(False, support, values, w_dec, grad_out, grad_norms)
    torch.testing.assert_close(got[2], want[2])


def test_build_is_cached_and_keyed_by_source(monkeypatch, tmp_path):
    """A changed source builds a new library (a stale one is never loaded)."""
    cc = cpu_kernels._compiler()
    if cc is None:
        pytest.skip("needs a C compiler (gcc or cc)")
    monkeypatch.setenv("CLT_LENS_KERNEL_DIR", str(tmp_path))
    first = cpu_kernels._build(cc)
    assert cpu_kernels._build(cc) == first and len(list(tmp_path.iterdir())) == 1
    changed = tmp_path / "src" / "cpu_kernels.c"
    changed.parent.mkdir()
    changed.write_text(cpu_kernels.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", changed)
    assert cpu_kernels._build(cc) != first


def test_mismatched_sizes_raise_before_the_c_code(kernels):
    support, values, w_dec, grad_out, _ = _case()
    bad = [*w_dec[:-1], w_dec[-1][:, :, :-1].contiguous()]  # one decoder with a smaller d
    with pytest.raises(ValueError, match=r"W_dec\[3\] has shape"):
        sparse_decode(support, values, bad)
    with pytest.raises((ValueError, IndexError)):  # the gather into feature-major order
        sparse_decode(support, values[:-1], w_dec)


def test_small_calls_stay_on_one_thread(monkeypatch):
    """Threads of our own only pay where the call is large (torch's workers spin meanwhile)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert cpu_kernels._threads(100, 1024, 128) == 1
    assert cpu_kernels._threads(20_000, 2048, 3072) == 4
