"""The C kernels against torch's ops: decode, encoder gradient and support building; values,
gradients, threads, fallback."""

from __future__ import annotations

import ctypes
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from clt_lens.clt import CLTConfig, CrossLayerTranscoder, cpu_kernels, grad_squares
from clt_lens.clt.sparse import (
    Support,
    encoder_grad_gather,
    sparse_decode,
    sparse_decode_with_norms,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")


@pytest.fixture(scope="module")
def kernels():
    if cpu_kernels.library() is None:
        pytest.skip("the CPU decode kernels did not build (needs a C compiler: gcc or cc)")
    return cpu_kernels


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count (which the kernels follow) set to ``n`` meanwhile."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_even_for_small_calls(monkeypatch) -> None:
    """The kernels' threads for the small cases of these tests too (both builds' thresholds)."""
    monkeypatch.setattr(cpu_kernels, "PARALLEL_WORK", 0)
    monkeypatch.setattr(cpu_kernels, "PARALLEL_WORK_OPENMP", 0)


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
    threads_even_for_small_calls(monkeypatch)
    case = _case(dtype=dtype)
    with torch_threads(threads):
        got = _run(True, *case)
    want = _run(False, *case)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, **tol)
    for g, w in zip(got[3], want[3]):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 3])
def test_backward_records_each_decoder_gradients_squares(kernels, dtype, threads, monkeypatch):
    """What the clipping norm takes instead of reading dL/dW_dec again: every row's squares,
    the norm gradient's rows included (layer 1 keeps nothing: its gradient is that alone)."""
    threads_even_for_small_calls(monkeypatch)
    need_w = [True, True, False, True]
    with torch_threads(threads), grad_squares.recording() as squares:
        grads = _run(True, *_case(dtype=dtype), need_w=need_w)[3]
    assert grad_squares.current() is None  # nothing is recorded outside a recording
    for g, need in zip(grads, need_w):
        if not need:
            assert g is None
            continue
        got = squares.sum_of_squares(g)
        assert got is not None and got.dtype == torch.float32
        torch.testing.assert_close(got, g.double().pow(2).sum().float())
    grads[0].add_(1.0)  # changed in place: the record no longer describes it
    assert squares.sum_of_squares(grads[0]) is None
    assert squares.sum_of_squares(grads[1].clone()) is None  # nor another tensor


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


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors(item)


def test_results_are_bitwise_independent_of_threads(kernels, monkeypatch):
    """Decode forward and backward, and the encoder's gradients."""
    threads_even_for_small_calls(monkeypatch)
    case = _case(n_layers=3, batch=64, n_features=96, d=32, density=0.1)
    encoder = _encoder_case(96, torch.float32, batch=64, density=0.3)
    results = []
    for threads in (1, 2, 4):
        with torch_threads(threads):
            results.append(list(_tensors([_run(True, *case), _encoder_grads(True, *encoder)])))
    assert len(results[0]) == 3 + 3 + 2
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results[0], strict=True))


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
    """Threads of our own (pthreads) only pay where the call is large (torch's workers spin
    meanwhile); on torch's OpenMP workers from much smaller calls on."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(cpu_kernels, "uses_openmp", lambda: False)
    assert cpu_kernels._threads((100 + 1024) * 128) == 1
    assert cpu_kernels._threads((20_000 + 2048) * 3072) == 4
    monkeypatch.setattr(cpu_kernels, "uses_openmp", lambda: True)
    assert cpu_kernels._threads((100 + 1024) * 128) == 4
    assert cpu_kernels._threads(100 * 20) == 1


def test_kernels_run_on_torchs_openmp_runtime(kernels):
    """One OpenMP runtime in the process: the kernels' parallel regions run on the workers of
    torch's ops, not on threads that compete with them for the cores."""
    if not cpu_kernels.uses_openmp():
        pytest.skip("this compiler builds the kernels without OpenMP (pthreads instead)")
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps (Linux) to list the loaded libraries")
    runtimes = {line.split()[-1] for line in maps.read_text().splitlines()
                if "libgomp" in line or "libiomp" in line or "libomp" in line}  # fmt: skip
    assert len(runtimes) == 1, runtimes


def test_pthread_build_equals_torch_ops(monkeypatch, tmp_path):
    """The build for compilers without OpenMP: its own threads, the same results."""
    cc = cpu_kernels._compiler()
    if cc is None:
        pytest.skip("needs a C compiler (gcc or cc)")
    monkeypatch.setenv("CLT_LENS_KERNEL_DIR", str(tmp_path))
    lib = ctypes.CDLL(str(cpu_kernels._build(cc, openmp=False)))
    cpu_kernels._declare(lib)
    assert lib.clt_openmp() == 0
    monkeypatch.setattr(cpu_kernels, "_library", lib)
    monkeypatch.setattr(cpu_kernels, "_tried", True)
    threads_even_for_small_calls(monkeypatch)
    case = _case()
    with torch_threads(3):
        got = _run(True, *case)
    want = _run(False, *case)
    for g, w in zip(list(_tensors(got)), list(_tensors(want)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---- the encoder gradient -------------------------------------------------------------------
def _encoder_case(n_features, dtype, n_layers=3, batch=37, d=20, density=0.15, seed=1):
    """A support with an empty layer, features kept nowhere and single-token features (the
    four-token loop's remainder); d not a multiple of the vector width."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_layers, batch, n_features, generator=g) < density
    mask[1] = False
    mask[:, :, :3] = False
    mask[0, :, 3] = False
    mask[0, 5, 3] = True
    support = Support.from_mask(mask)
    x = torch.randn(n_layers, batch, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(n_layers, d, n_features, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n_layers, n_features, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(support.nnz, generator=g, dtype=torch.float64).to(dtype)
    return support, x, w, b, grad


def _encoder_grads(use_kernels, support, x, w, b, grad, need_w=True, need_b=True):
    old = cpu_kernels.set_enabled(use_kernels)
    try:
        w_, b_ = w.clone().requires_grad_(need_w), b.clone().requires_grad_(need_b)
        pre_s = torch.bmm(x, w).reshape(-1)[support.flat]
        encoder_grad_gather(support, pre_s, x, w_, b_).backward(grad)
        return w_.grad, b_.grad
    finally:
        cpu_kernels.set_enabled(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_features", [53, 80])  # a partial block; whole aligned blocks
@pytest.mark.parametrize("threads", [1, 3])
def test_encoder_gradient_equals_torch_ops(kernels, dtype, n_features, threads, monkeypatch):
    threads_even_for_small_calls(monkeypatch)
    case = _encoder_case(n_features, dtype)
    calls = []
    real = cpu_kernels.encoder_grad
    monkeypatch.setattr(cpu_kernels, "encoder_grad",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    with torch_threads(threads):
        got = _encoder_grads(True, *case)
        only_w = _encoder_grads(True, *case, need_b=False)
        only_b = _encoder_grads(True, *case, need_w=False)
    assert len(calls) == 3
    want = _encoder_grads(False, *case)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert torch.equal(only_w[0], got[0]) and only_w[1] is None
    assert torch.equal(only_b[1], got[1]) and only_b[0] is None
    assert not got[0][1].any()  # the empty layer's gradient is written, as zeros


# ---- support building -----------------------------------------------------------------------
def _above(use_kernels, pre, cut):
    old = cpu_kernels.set_enabled(use_kernels)
    try:
        return Support.above(pre, cut)
    finally:
        cpu_kernels.set_enabled(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_features", [53, 96])  # a partial 32-bit word; whole words
@pytest.mark.parametrize("threads", [1, 3])
def test_support_above_equals_torch_ops(kernels, dtype, n_features, threads, monkeypatch):
    """Every index array, the layer pointers and the values; ties at the cut, NaN and infinite
    pre-activations, a layer with nothing kept and one with everything kept."""
    threads_even_for_small_calls(monkeypatch)
    g = torch.Generator().manual_seed(2)
    n_layers, batch = 4, 29
    pre = torch.randn(n_layers, batch, n_features, generator=g, dtype=torch.float64).to(dtype)
    cut = torch.rand(n_layers, n_features, generator=g, dtype=torch.float64).to(dtype) + 0.5
    pre[0, 3, : n_features // 2] = cut[0, : n_features // 2]  # ties: not kept
    pre[0, 4, 7], pre[0, 4, 9], pre[0, 4, 11] = float("nan"), float("inf"), -float("inf")
    pre[0, 6, -1] = cut[0, -1] + 1  # the last feature of a row
    cut[1] = float("inf")
    cut[2] = -float("inf")
    with torch_threads(threads):
        got, got_values = _above(True, pre, cut)
    want, want_values = _above(False, pre, cut)
    for name in ("flat", "rows", "cols", "lf", "crow"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.layer_ptr == want.layer_ptr
    assert torch.equal(got_values, want_values) and got_values.dtype == dtype
    assert got.layer_ptr[2] == got.layer_ptr[1]  # nothing passes +inf
    assert got.layer_ptr[3] - got.layer_ptr[2] == batch * n_features  # everything passes -inf


def test_the_cpu_training_step_builds_its_support_and_encoder_gradient_here(kernels, monkeypatch):
    """JumpReLU and ReLU steps run both kernels; a step with them equals one without."""
    calls = []
    for name in ("support_above", "encoder_grad"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name,
                            lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    for activation in ("jumprelu", "relu"):
        torch.manual_seed(0)
        clt = CrossLayerTranscoder(CLTConfig(d_in=24, d_sae=48, n_layers=3, decode="sparse",
                                             activation=activation))  # fmt: skip
        x, y = torch.randn(32, 3, 24) * 2, torch.randn(32, 3, 24)
        grads = []
        for use in (True, False):
            old = cpu_kernels.set_enabled(use)
            try:
                clt.zero_grad()
                out = clt.training_forward(x, y, sparsity_coeff=0.05)
                out.loss.backward()
                grads.append({n: p.grad.clone() for n, p in clt.named_parameters()
                              if p.grad is not None})  # fmt: skip
            finally:
                cpu_kernels.set_enabled(old)
        assert grads[0].keys() == grads[1].keys() and "W_enc" in grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    assert calls == ["support_above", "encoder_grad"] * 2


def test_support_and_encoder_sizes_are_checked_before_the_c_code(kernels):
    pre = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match="cut of shape"):
        cpu_kernels.support_above(pre, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="one dtype"):
        cpu_kernels.support_above(pre, torch.zeros(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        cpu_kernels.support_above(pre.transpose(0, 1), torch.zeros(5, 7))
    support, x, w, b, grad = _encoder_case(53, torch.float32)
    with pytest.raises(ValueError, match="encoder gradient"):
        cpu_kernels.encoder_grad(support, grad[:-1], x, True, True)
    with pytest.raises(ValueError, match="encoder gradient"):
        cpu_kernels.encoder_grad(support, grad, x[:, :-1].contiguous(), True, True)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_kernels.encoder_grad(support, grad, x.double(), True, True)
    with pytest.raises(ValueError, match="pre-activations of shape"):
        encoder_grad_gather(support, torch.bmm(x, w), x, w, b)
