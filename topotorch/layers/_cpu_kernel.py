"""A small C kernel for the FFF hard forward on CPU, compiled on first use (optional).

The hard forward of a depth-``d`` FFF needs, per sample, ``d`` dot products of length ``in``
(the routing) and one leaf (``in -> ℓ -> out``). In tensor ops every level is a gather plus a
dot product and every leaf a gather-sum (``embedding_bag``): about a dozen passes over
per-sample copies. This kernel does it in one pass per sample: walk the tree with vectorised
dot products, then compute the leaf straight from its weights, with samples visited in
leaf order (a counting sort), so a leaf's weights are read from memory once per batch chunk
and stay in cache for the other samples that chose it. Batches are split over
``torch.get_num_threads()`` POSIX threads.

The C source (``fff_cpu.c`` + ``fff_cpu_impl.h`` beside this file, shipped as package data) is
compiled with the system C compiler (``$CC`` or ``cc``; ``-O3 -march=native``,
or plain ``-O3`` if the compiler rejects that) into ``$TOPOTORCH_CACHE`` (default
``~/.cache/topotorch``) the first time it is needed, and loaded with :mod:`ctypes`. Without a
compiler, or with ``TOPOTORCH_NO_KERNEL=1``, :func:`kernel` returns None and the FFF layer uses
its tensor-op paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["kernel", "kernel_error", "hard_forward", "ACT_CODES", "MAX_LEAF_WIDTH"]

# Activations the kernel applies itself; any other runs in torch between the two halves.
ACT_IDENTITY, ACT_RELU, ACT_GELU, ACT_NONE = 0, 1, 2, -1
ACT_CODES = {"identity": ACT_IDENTITY, "relu": ACT_RELU, "gelu": ACT_GELU}
MAX_LEAF_WIDTH = 256

# The C source lives beside this loader (package data): fff_cpu.c instantiates fff_cpu_impl.h for
# float and double. It is compiled where it lies (the #include is relative to it), nothing is copied.
SOURCE_FILES = (Path(__file__).with_name("fff_cpu.c"), Path(__file__).with_name("fff_cpu_impl.h"))


def source() -> str:
    """The kernel's C source (both files), as compiled; part of the build cache key. Usage: ``print(source())``."""
    return "\n".join(f.read_text() for f in SOURCE_FILES)


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _flag_sets() -> list[list[str]]:
    base = ["-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno"]
    tuned = ["-march=native"] + (["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])
    # OpenMP first (threads shared with torch's pool), then plain POSIX threads; the portable
    # sets if the compiler rejects the tuned ones
    omp = ["-fopenmp"] if _torch_uses_gomp() else []
    sets = [base + tuned + omp, base + omp, base + tuned, base] if omp else [base + tuned, base]
    return sets


def _torch_uses_gomp() -> bool:
    """Does torch run its intra-op pool on the GNU OpenMP it ships (so a -fopenmp kernel, bound by
    soname to the already-loaded libgomp.so.1, joins that same pool)?"""
    import torch

    return (
        sys.platform.startswith("linux")
        and "OpenMP" in torch.__config__.parallel_info()
        and (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists()
    )


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    cache = Path(os.environ.get("TOPOTORCH_CACHE", Path.home() / ".cache" / "topotorch")) / "kernels"
    errors = []
    text = source()  # a missing or unreadable file: an OSError naming it, reported by kernel_error()
    for flags in _flag_sets():
        flags = [*flags, f"-DFFF_LMAX={MAX_LEAF_WIDTH}"]
        key = hashlib.sha256(
            "\n".join([text, cc, " ".join(flags), _cpu_signature(), sys.platform]).encode()
        ).hexdigest()[:16]
        so = cache / f"fff_cpu_{key}.so"
        if so.exists():
            break
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            tmp_so = Path(tmp) / "fff_cpu.so"
            r = subprocess.run(
                [cc, *flags, str(SOURCE_FILES[0]), "-o", str(tmp_so), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if r.returncode == 0:
                os.replace(tmp_so, so)  # atomic: concurrent builders each write a whole file
                break
            errors.append(f"{cc} {' '.join(flags)}: {r.stderr.strip()[:300]}")
    else:
        raise RuntimeError("; ".join(errors))
    lib = ctypes.CDLL(str(so))
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fff_vector_width_f32.restype = c_int
    lib.fff_vector_width_f32.argtypes = []
    for s in ("f32", "f64"):
        fn = getattr(lib, f"fff_hard_{s}")
        fn.restype = c_int
        fn.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, p, p, c_int, c_int, p, p, p, c_int]
    return lib


def kernel() -> ctypes.CDLL | None:
    """The compiled library, or None (no compiler, not Linux/macOS, or ``TOPOTORCH_NO_KERNEL=1``).

    Built once per process (and cached on disk across processes). Usage: ``kernel() is not None``.
    """
    global _lib, _error, _tried
    if os.environ.get("TOPOTORCH_NO_KERNEL", "0") not in ("", "0"):
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                if os.name != "posix":
                    raise RuntimeError("the CPU kernel needs a POSIX system")
                _lib = _build()
            except Exception as e:  # noqa: BLE001 - any failure means: use the tensor-op paths
                _lib, _error = None, f"{type(e).__name__}: {e}"
            _tried = True
    return _lib


def kernel_error() -> str | None:
    """Why :func:`kernel` returned None (after it was called), else None. Usage: ``print(kernel_error())``."""
    return _error


_scratch = threading.local()  # per Python thread (the kernel runs without the GIL): leaves nobody asked for


def _leaf_scratch(B: int) -> torch.Tensor:
    buf = getattr(_scratch, "leaves", None)
    if buf is None or buf.numel() < B:
        buf = _scratch.leaves = torch.empty(max(B, 256), dtype=torch.int64)
    return buf


def hard_forward(
    x: torch.Tensor,
    nw: torch.Tensor,
    nb: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    depth: int,
    act: int,
    activation=None,
    route_only: bool = False,
    need_leaves: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(y, leaves) for contiguous CPU float32/float64 tensors, ``x`` (B, in), with the kernel.

    ``act`` is one of :data:`ACT_CODES`' values, or ``ACT_NONE`` to apply ``activation`` (a
    callable on the (B, ℓ) hidden pre-activations) in torch between the two halves. With
    ``route_only`` y is None; with ``need_leaves=False`` the leaves go to a per-thread scratch
    buffer and None is returned for them (one allocation less per call: batch 1 is all overhead).
    Usage: ``y, leaves = hard_forward(x, *weights, depth, ACT_RELU)``.
    """
    lib = _lib if _lib is not None else kernel()
    if lib is None:
        raise RuntimeError(f"the FFF CPU kernel is not available ({kernel_error() or 'disabled'})")
    B, n_in = x.shape
    l, out = w1.shape[-1], w2.shape[-1]
    fn = lib.fff_hard_f32 if x.dtype == torch.float32 else lib.fff_hard_f64
    leaves = torch.empty(B, dtype=torch.int64) if need_leaves or route_only or act == ACT_NONE else _leaf_scratch(B)
    nthreads = torch.get_num_threads()
    if route_only:
        rc = fn(
            x.data_ptr(),
            B,
            n_in,
            l,
            out,
            depth,
            nw.data_ptr(),
            nb.data_ptr(),
            None,
            None,
            None,
            None,
            0,
            0,
            None,
            None,
            leaves.data_ptr(),
            nthreads,
        )
        y = None
    else:
        y = torch.empty(B, out, dtype=x.dtype)
        h = torch.empty(B, l, dtype=x.dtype) if act == ACT_NONE else None
        rc = fn(
            x.data_ptr(),
            B,
            n_in,
            l,
            out,
            depth,
            nw.data_ptr(),
            nb.data_ptr(),
            w1.data_ptr(),
            b1.data_ptr(),
            w2.data_ptr(),
            b2.data_ptr(),
            ACT_IDENTITY if h is not None else act,
            1,
            y.data_ptr(),
            h.data_ptr() if h is not None else None,
            leaves.data_ptr(),
            nthreads,
        )
        if h is not None and rc == 0:
            a = activation(h).contiguous()
            rc = fn(
                None,
                B,
                n_in,
                l,
                out,
                depth,
                None,
                None,
                None,
                None,
                w2.data_ptr(),
                b2.data_ptr(),
                0,
                2,
                y.data_ptr(),
                a.data_ptr(),
                leaves.data_ptr(),
                nthreads,
            )
    if rc != 0:
        raise RuntimeError(f"FFF CPU kernel failed (code {rc})")
    return y, (leaves if need_leaves or route_only else None)
