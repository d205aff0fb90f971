"""The CPU decode kernels (``cpu_kernels.c``): built at first use, with torch's ops as fallback.

``sparse.py`` decodes through these on the CPU when they load and every tensor is a contiguous
float32/float64 CPU tensor; otherwise (CUDA, half-precision decoders, no C compiler, or
``CLT_LENS_CPU_KERNELS=0`` in the environment) it uses torch's sparse ops, which compute the
same values (benchmarks/train.py times the training step both ways).

The shared library is compiled once per source, flags, compiler and CPU with the C compiler
in ``$CC`` (else ``cc``) into ``$CLT_LENS_KERNEL_DIR`` (else ``~/.cache/clt_lens/kernels``),
keyed by a hash of all four, and renamed into place so concurrent processes (torchrun ranks) never
load a half-written file. It is built with OpenMP where the compiler has it: its parallel
regions then run on the OpenMP runtime torch has loaded (torch's own ``libgomp.so.1`` meets the
library's need for one), on the same worker threads as torch's ops. Without OpenMP it starts
pthreads of its own. A failed build warns once and falls back; it never stops a run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.profiler import record_function

if TYPE_CHECKING:
    from clt_lens.clt.sparse import Support

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ENV_SWITCH = "CLT_LENS_CPU_KERNELS"
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
_OPENMP = ["-fopenmp"]  # tried first; a compiler without it builds the pthread version
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_P, _I = ctypes.c_void_p, ctypes.c_int64

_library: ctypes.CDLL | None = None
_tried = False
_enabled = True


def set_enabled(flag: bool) -> bool:
    """Use the kernels where they apply (True) or always torch's ops; returns the old value."""
    global _enabled
    old, _enabled = _enabled, bool(flag)
    return old


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU's model and feature flags."""
    lines = [platform.machine()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part"):
                lines.append(line)
                if len(lines) > 3:
                    break
    except OSError:
        pass
    return "\n".join(lines)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str, openmp: bool = True) -> Path:
    """The library's path, compiled first if no build of this source, compiler, CPU and flag
    set is cached; with OpenMP unless ``openmp`` is False or the compiler lacks it."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = SOURCE.read_bytes()
    folder = Path(os.environ.get("CLT_LENS_KERNEL_DIR") or
                  Path.home() / ".cache" / "clt_lens" / "kernels")  # fmt: skip
    error = ""
    for flags in ([*_FLAGS, *_OPENMP], _FLAGS) if openmp else (_FLAGS,):
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(),
                        _cpu_signature().encode()])  # fmt: skip
        ).hexdigest()[:16]
        target = folder / f"cpu_kernels-{key}.so"
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built)],
                                    capture_output=True, text=True)  # fmt: skip
            if result.returncode == 0:
                os.replace(built, target)
                return target
            error = result.stderr.strip()[-400:]
    raise RuntimeError(f"{cc} failed on {SOURCE.name}: {error}")


def _declare(lib: ctypes.CDLL) -> None:
    lib.clt_openmp.argtypes = []
    lib.clt_openmp.restype = ctypes.c_int
    for sfx in _SUFFIX.values():
        fwd = getattr(lib, f"clt_decode_forward_{sfx}")
        fwd.argtypes = [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, ctypes.c_int]
        fwd.restype = ctypes.c_int
        bwd = getattr(lib, f"clt_decode_backward_{sfx}")
        bwd.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int]
        bwd.restype = ctypes.c_int
        enc = getattr(lib, f"clt_encoder_grad_{sfx}")
        enc.argtypes = [_I, _I, _P, _P, _P, _P, _P, _P, ctypes.c_int]
        enc.restype = ctypes.c_int
        count = getattr(lib, f"clt_count_above_{sfx}")
        count.argtypes = [_I, _I, _I, _P, _P, _P, ctypes.c_int]
        count.restype = ctypes.c_int
        gather = getattr(lib, f"clt_gather_above_{sfx}")
        gather.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int]
        gather.restype = ctypes.c_int


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None where they cannot be built."""
    global _library, _tried
    if not _tried:
        _tried = True
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc)")
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
            _library = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            warnings.warn(
                f"clt_lens: CPU decode kernels unavailable ({exc}); decoding with torch's "
                "sparse ops instead (same results, slower)", stacklevel=2,
            )
    return _library


def _switched_on() -> bool:
    return _enabled and os.environ.get(ENV_SWITCH, "1").strip() not in ("0", "false", "no")


def _unfit(tensors: Sequence[Tensor]) -> Tensor | None:
    """The first tensor the C code cannot read as contiguous CPU memory of the first one's
    float32/float64 dtype, else None."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != tensors[0].dtype or not t.is_contiguous() or \
                t.dtype not in _SUFFIX:
            return t
    return None


def applies(*tensors: Tensor) -> bool:
    """Whether the kernels can take these: CPU, one float32/float64 dtype, contiguous."""
    if not _switched_on() or not tensors or _unfit(tensors) is not None:
        return False
    return library() is not None


# Below this many multiply-adds per call the pthread build runs on the calling thread alone: a
# thread of its own would compete for a core with torch's OpenMP workers, which keep spinning
# after each torch op (at the demo's shape, 2 threads took 19 ms where 1 took 14 and torch's
# ops 17). The OpenMP build runs on those workers, so it pays from much smaller calls on (the
# demo's step 1.14-1.18x faster on two threads than with the pthread build's threshold).
PARALLEL_WORK = 2**24
PARALLEL_WORK_OPENMP = 2**16


def uses_openmp() -> bool:
    """Whether the loaded kernels run their threads on the OpenMP runtime (torch's)."""
    lib = library()
    return lib is not None and bool(lib.clt_openmp())


def _threads(work: int) -> int:
    """Threads for one call of ``work`` multiply-adds (or element visits): torch's intra-op
    count (within MAX_THREADS in the C file) when the call is large enough to pay for them,
    else 1."""
    if work < (PARALLEL_WORK_OPENMP if uses_openmp() else PARALLEL_WORK):
        return 1
    return min(max(1, torch.get_num_threads()), 256)


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _at(t: Tensor, offset: int) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() + offset * t.element_size())


def _check_shapes(support: Support, values_t: Tensor, w_dec: Sequence[Tensor],
                  grad_out: Tensor | None = None) -> None:  # fmt: skip
    """The C code trusts every size it is given: a mismatch must stop here, not corrupt memory."""
    n_layers, n_features = support.n_layers, support.n_features
    d = w_dec[0].shape[-1] if w_dec else 0
    if len(w_dec) != n_layers or values_t.numel() != support.nnz:
        raise ValueError(
            f"sparse decode: {len(w_dec)} decoders and {values_t.numel()} values for a "
            f"support of {n_layers} layers and {support.nnz} entries"
        )
    for i, w in enumerate(w_dec):
        if w.dim() != 3 or w.shape[0] != n_features or w.shape[2] != d or \
                i + w.shape[1] > n_layers:
            raise ValueError(f"sparse decode: W_dec[{i}] has shape {tuple(w.shape)}; expected "
                             f"[{n_features}, <= {n_layers - i}, {d}]")  # fmt: skip
    if grad_out is not None and tuple(grad_out.shape) != (support.batch, n_layers, d):
        raise ValueError(f"sparse decode: gradient of shape {tuple(grad_out.shape)}, expected "
                         f"{(support.batch, n_layers, d)}")  # fmt: skip


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"clt_lens CPU kernel {what}: out of memory for its work buffer")
    if rc != 0:
        raise RuntimeError(f"clt_lens CPU kernel {what} failed to start its threads (rc={rc})")


def decode_forward(
    support: Support, values_t: Tensor, w_dec: Sequence[Tensor], with_norms: bool
) -> tuple[Tensor, Tensor | None]:
    """[B, L, d] decoded output and (if asked) the decoder norms [L, F]; ``values_t`` are the
    support's values in its transposed (feature-major) order."""
    lib = library()
    assert lib is not None
    kernel = getattr(lib, f"clt_decode_forward_{_SUFFIX[values_t.dtype]}")
    _check_shapes(support, values_t, w_dec)
    n_layers, batch, n_features = support.n_layers, support.batch, support.n_features
    d = w_dec[0].shape[-1]
    _, crow_t, tok_t = support.transposed()
    out = values_t.new_zeros(batch, n_layers, d)
    sumsq = values_t.new_empty(n_layers, n_features) if with_norms else None
    with record_function("clt_lens::decode_forward"):
        for i, w in enumerate(w_dec):
            a, b = support.layer_ptr[i], support.layer_ptr[i + 1]
            row = w[0].numel() if n_features else 0
            _check(kernel(n_features, batch, row, n_layers * d, _ptr(crow_t[i]), _at(tok_t, a),
                          _at(values_t, a), _ptr(w), _at(out, i * d),
                          None if sumsq is None else _ptr(sumsq[i]),
                          _threads((b - a + n_features) * row)),
                   "decode_forward")  # fmt: skip
    return out, None if sumsq is None else sumsq.sqrt_()


def decode_backward(
    support: Support,
    values_t: Tensor,
    w_dec: Sequence[Tensor],
    grad_out: Tensor,
    norm_scale: Tensor | None,
    need_values: bool,
    need_w: Sequence[bool],
    grad_sumsq: Tensor | None = None,
) -> tuple[Tensor | None, list[Tensor | None]]:
    """dL/d values (in the transposed order) and dL/dW_dec per source layer.

    ``norm_scale`` [L, F] is dL/d|W_dec[f]| / |W_dec[f]|: the decoder norms' gradient, folded
    into dL/dW_dec in the same pass. ``grad_sumsq`` [L, F], if given, receives each row's sum
    of squares of dL/dW_dec (where it is computed), for the clipping norm.
    """
    lib = library()
    assert lib is not None
    kernel = getattr(lib, f"clt_decode_backward_{_SUFFIX[values_t.dtype]}")
    _check_shapes(support, values_t, w_dec, grad_out)
    n_layers, n_features = support.n_layers, support.n_features
    d = w_dec[0].shape[-1]
    _, crow_t, tok_t = support.transposed()
    grad_out = grad_out.to(values_t.dtype).contiguous()
    if norm_scale is not None:
        norm_scale = norm_scale.to(values_t.dtype).contiguous()
    grad_values_t = torch.empty_like(values_t) if need_values else None
    if grad_sumsq is not None and (grad_sumsq.shape != (n_layers, n_features) or
                                   grad_sumsq.dtype != values_t.dtype or
                                   not grad_sumsq.is_contiguous()):  # fmt: skip
        raise ValueError(f"sparse decode: gradient squares buffer {tuple(grad_sumsq.shape)} "
                         f"({grad_sumsq.dtype}), expected contiguous {(n_layers, n_features)} "
                         f"({values_t.dtype})")  # fmt: skip
    grads_w = [torch.empty_like(w) if need else None for w, need in zip(w_dec, need_w)]
    with record_function("clt_lens::decode_backward"):
        for i, (w, gw) in enumerate(zip(w_dec, grads_w)):
            if gw is None and grad_values_t is None:
                continue
            a, b = support.layer_ptr[i], support.layer_ptr[i + 1]
            row = w[0].numel() if n_features else 0
            _check(kernel(n_features, row, n_layers * d, _ptr(crow_t[i]), _at(tok_t, a),
                          _at(values_t, a), _ptr(w), _at(grad_out, i * d),
                          None if norm_scale is None else _ptr(norm_scale[i]),
                          None if grad_values_t is None else _at(grad_values_t, a), _ptr(gw),
                          None if grad_sumsq is None else _ptr(grad_sumsq[i]),
                          _threads((b - a + n_features) * row)),
                   "decode_backward")  # fmt: skip
    return grad_values_t, grads_w


def _check_plain(what: str, *tensors: Tensor) -> None:
    """What ``applies`` tests, raised, for the functions below that may be called directly."""
    t = _unfit(tensors)
    if t is not None:
        raise ValueError(f"{what}: needs contiguous CPU float32/float64 tensors of one dtype, "
                         f"got {t.dtype} on {t.device} "
                         f"({'' if t.is_contiguous() else 'not '}contiguous)")  # fmt: skip


def encoder_grad(
    support: Support, grad_t: Tensor, x_lbd: Tensor, need_w: bool, need_b: bool
) -> tuple[Tensor | None, Tensor | None]:
    """dL/dW_enc [L, d, F] and dL/db_enc [L, F] from the gradient at the support's entries,
    given in its transposed (feature-major) order, and the encoder's inputs ``x_lbd`` [L, B, d].

    Written straight into W_enc's [d, F] layout, a block of features at a time: torch's path
    computes [F, d] and then copies it transposed, which took longer than the product itself.
    """
    lib = library()
    assert lib is not None
    _check_plain("encoder gradient", grad_t, x_lbd)
    kernel = getattr(lib, f"clt_encoder_grad_{_SUFFIX[grad_t.dtype]}")
    n_layers, batch, n_features = support.n_layers, support.batch, support.n_features
    if grad_t.numel() != support.nnz or x_lbd.dim() != 3 or \
            tuple(x_lbd.shape[:2]) != (n_layers, batch):
        raise ValueError(f"encoder gradient: {grad_t.numel()} values and inputs of shape "
                         f"{tuple(x_lbd.shape)} for a support of {support.nnz} entries over "
                         f"[{n_layers}, {batch}, {n_features}]")  # fmt: skip
    if not need_w and not need_b:
        return None, None
    d = x_lbd.shape[2]
    _, crow_t, tok_t = support.transposed()
    grad_w = grad_t.new_empty(n_layers, d, n_features) if need_w else None
    grad_b = grad_t.new_empty(n_layers, n_features) if need_b else None
    with record_function("clt_lens::encoder_grad"):
        for i in range(n_layers):
            a, b = support.layer_ptr[i], support.layer_ptr[i + 1]
            _check(kernel(n_features, d, _ptr(crow_t[i]), _at(tok_t, a), _at(grad_t, a),
                          _ptr(x_lbd[i]), None if grad_w is None else _ptr(grad_w[i]),
                          None if grad_b is None else _ptr(grad_b[i]),
                          _threads((b - a + n_features) * d)),
                   "encoder_grad")  # fmt: skip
    return grad_w, grad_b


def support_above(pre_lbf: Tensor, cut_lf: Tensor) -> tuple[Tensor, ...]:
    """Where ``pre_lbf`` [L, B, F] > ``cut_lf`` [L, F], in (l, b, f) order: (per-row counts
    [L, B], flat index, token, feature, layer * F + feature, value), one pass to count and one
    to write (torch's compare, ``nonzero`` and gather took three, plus a [L, B, F] mask)."""
    lib = library()
    assert lib is not None
    _check_plain("support", pre_lbf, cut_lf)
    sfx = _SUFFIX[pre_lbf.dtype]
    n_layers, batch, n_features = pre_lbf.shape
    if tuple(cut_lf.shape) != (n_layers, n_features) or cut_lf.dtype != pre_lbf.dtype:
        raise ValueError(f"support: cut of shape {tuple(cut_lf.shape)} ({cut_lf.dtype}) for "
                         f"pre-activations {tuple(pre_lbf.shape)} ({pre_lbf.dtype})")
    counts = torch.empty(n_layers, batch, dtype=torch.int64)
    threads = _threads(pre_lbf.numel())
    with record_function("clt_lens::support_above"):
        _check(getattr(lib, f"clt_count_above_{sfx}")(
            n_layers, batch, n_features, _ptr(pre_lbf), _ptr(cut_lf), _ptr(counts), threads),
            "count_above")  # fmt: skip
        offset = counts.view(-1).cumsum(0)
        nnz = int(offset[-1]) if offset.numel() else 0
        offset -= counts.view(-1)
        flat, tok, feat, lf = (torch.empty(nnz, dtype=torch.int64) for _ in range(4))
        vals = pre_lbf.new_empty(nnz)
        _check(getattr(lib, f"clt_gather_above_{sfx}")(
            n_layers, batch, n_features, _ptr(pre_lbf), _ptr(cut_lf), _ptr(offset), _ptr(flat),
            _ptr(tok), _ptr(feat), _ptr(lf), _ptr(vals), threads),
            "gather_above")  # fmt: skip
    return counts, flat, tok, feat, lf, vals
