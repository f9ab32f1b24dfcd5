"""A small C kernel for the FFF hard forward on CPU, compiled on first use (optional).

The hard forward of a depth-``d`` FFF needs, per sample, ``d`` dot products of length ``in``
(the routing) and one leaf (``in -> ℓ -> out``). In tensor ops every level is a gather plus a
dot product and every leaf a gather-sum (``embedding_bag``): about a dozen passes over
per-sample copies. This kernel does it in one pass per sample: walk the tree with vectorised
dot products, then compute the leaf straight from its weights, with samples visited in
leaf order (a counting sort), so a leaf's weights are read from memory once per batch chunk
and stay in cache for the other samples that chose it. Batches are split over
``torch.get_num_threads()`` POSIX threads.

The C source is compiled with the system C compiler (``$CC`` or ``cc``; ``-O3 -march=native``,
or plain ``-O3`` if the compiler rejects that) into ``$TOPOTORCH_CACHE`` (default ``~/.cache/topotorch``) the first time it is needed, and
loaded with :mod:`ctypes`. Without a compiler, or with ``TOPOTORCH_NO_KERNEL=1``,
:func:`kernel` returns None and the FFF layer uses its tensor-op paths.
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

_TEMPLATE = r"""
/* ---- REAL = @T@, vectors of @W@ ------------------------------------------------------- */
typedef @T@ vec_@S@ __attribute__((vector_size(@W@ * sizeof(@T@)), aligned(sizeof(@T@))));
typedef @T@ vech_@S@ __attribute__((vector_size(@W@ / 2 * sizeof(@T@)), aligned(sizeof(@T@))));
#define LD_@S@(p) (*(const vec_@S@ *)(p))

static inline @T@ hsum_@S@(vec_@S@ v) {
    @T@ s = 0;
    for (int j = 0; j < @W@; j++) s += v[j];
    return s;
}

/* Every routing dot product sums in the same order (two vector chains, then the scalar tail),
   alone (dot_) or four samples interleaved (dot4_), so a sample takes the same path and gets
   the same output alone or anywhere in a batch. */
static inline @T@ dot_@S@(const @T@ *restrict a, const @T@ *restrict b, int64_t n) {
    vec_@S@ s0 = {0}, s1 = {0};
    int64_t i = 0;
    for (; i + 2 * @W@ <= n; i += 2 * @W@) {
        s0 += LD_@S@(a + i) * LD_@S@(b + i);
        s1 += LD_@S@(a + i + @W@) * LD_@S@(b + i + @W@);
    }
    @T@ s = hsum_@S@(s0 + s1);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* four independent dot products (four samples' routing at one level), two chains each, in
   dot_'s order */
static inline void dot4_@S@(const @T@ *const *w, const @T@ *const *x, int64_t n, @T@ *z) {
    vec_@S@ a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    int64_t i = 0;
    for (; i + 2 * @W@ <= n; i += 2 * @W@) {
        a0 += LD_@S@(w[0] + i) * LD_@S@(x[0] + i);
        a1 += LD_@S@(w[1] + i) * LD_@S@(x[1] + i);
        a2 += LD_@S@(w[2] + i) * LD_@S@(x[2] + i);
        a3 += LD_@S@(w[3] + i) * LD_@S@(x[3] + i);
        b0 += LD_@S@(w[0] + i + @W@) * LD_@S@(x[0] + i + @W@);
        b1 += LD_@S@(w[1] + i + @W@) * LD_@S@(x[1] + i + @W@);
        b2 += LD_@S@(w[2] + i + @W@) * LD_@S@(x[2] + i + @W@);
        b3 += LD_@S@(w[3] + i + @W@) * LD_@S@(x[3] + i + @W@);
    }
    z[0] = hsum_@S@(a0 + b0); z[1] = hsum_@S@(a1 + b1); z[2] = hsum_@S@(a2 + b2); z[3] = hsum_@S@(a3 + b3);
    for (; i < n; i++)
        for (int j = 0; j < 4; j++) z[j] += w[j][i] * x[j][i];
}

static inline @T@ act_@S@(@T@ v, int act) {
    if (act == 1) return v > 0 ? v : 0;
    if (act == 2) return (@T@)0.5 * v * ((@T@)1 + @ERF@(v * (@T@)0.70710678118654752440));
    return v;
}

typedef struct {
    const @T@ *x, *nw, *nb, *w1, *b1, *w2, *b2;
    @T@ *y, *h;
    int64_t *leaves;
    const int64_t *order;
    int64_t lo, hi, in, l, out, depth;
    int act, phase;
} job_@S@;

/* y = b2 + a @ w2 (a: l values, w2: l x out). Rows of w2 whose activation is exactly 0 (ReLU
   zeros) are not read: half the second layer's memory traffic at typical ReLU sparsity. */
static inline __attribute__((always_inline)) void out_@S@(const @T@ *restrict a, const @T@ *restrict w2,
                                                          const @T@ *restrict b2, @T@ *restrict y,
                                                          const int64_t l, const int64_t out) {
    const @T@ *rows[@LMAX@];
    @T@ av[@LMAX@];
    int64_t m = 0;
    for (int64_t k = 0; k < l; k++)
        if (a[k] != 0) { rows[m] = w2 + k * out; av[m] = a[k]; m++; }
    int64_t o = 0;
    for (; o + @W@ <= out; o += @W@) {
        vec_@S@ v = LD_@S@(b2 + o);
        for (int64_t j = 0; j < m; j++) v += av[j] * LD_@S@(rows[j] + o);
        *(vec_@S@ *)(y + o) = v;
    }
    for (; o < out; o++) {
        @T@ v = b2[o];
        for (int64_t j = 0; j < m; j++) v += av[j] * rows[j][o];
        y[o] = v;
    }
}

/* h = x @ w1 for a leaf width l that is a multiple of the vector width (NV vectors per row) */
#define LEAF_VEC_@S@(VT, VW, NV)                                                                   \
    do {                                                                                     \
        VT c0[NV], c1[NV], c2[NV], c3[NV], c4[NV], c5[NV], c6[NV], c7[NV];              \
        for (int v = 0; v < NV; v++)                                                         \
            c0[v] = c1[v] = c2[v] = c3[v] = c4[v] = c5[v] = c6[v] = c7[v] = (VT){0};    \
        int64_t i = 0;                                                                       \
        for (; i + 8 <= in; i += 8) {                                                        \
            const @T@ *w = w1 + i * l;                                                       \
            for (int v = 0; v < NV; v++) {                                                   \
                c0[v] += x[i] * *(const VT *)(w + v * VW);                                         \
                c1[v] += x[i + 1] * *(const VT *)(w + l + v * VW);                                 \
                c2[v] += x[i + 2] * *(const VT *)(w + 2 * l + v * VW);                             \
                c3[v] += x[i + 3] * *(const VT *)(w + 3 * l + v * VW);                             \
                c4[v] += x[i + 4] * *(const VT *)(w + 4 * l + v * VW);                             \
                c5[v] += x[i + 5] * *(const VT *)(w + 5 * l + v * VW);                             \
                c6[v] += x[i + 6] * *(const VT *)(w + 6 * l + v * VW);                             \
                c7[v] += x[i + 7] * *(const VT *)(w + 7 * l + v * VW);                             \
            }                                                                                \
        }                                                                                    \
        for (; i < in; i++)                                                                  \
            for (int v = 0; v < NV; v++) c0[v] += x[i] * *(const VT *)(w1 + i * l + v * VW);      \
        for (int v = 0; v < NV; v++) {                                                       \
            VT t = ((c0[v] + c1[v]) + (c2[v] + c3[v])) + ((c4[v] + c5[v]) + (c6[v] + c7[v])); \
            for (int j = 0; j < VW; j++) hid[v * VW + j] = t[j];                           \
        }                                                                                    \
    } while (0)

static inline __attribute__((always_inline)) void leaf_@S@(const job_@S@ *J, int64_t b, const int64_t l) {
    const int64_t in = J->in, out = J->out, leaf = J->leaves[b];
    const @T@ *restrict x = J->x + b * in, *restrict w1 = J->w1 + leaf * in * l;
    @T@ hid[@LMAX@];
    if (l == @W@ / 2) LEAF_VEC_@S@(vech_@S@, @W@ / 2, 1);
    else if (l == @W@) LEAF_VEC_@S@(vec_@S@, @W@, 1);
    else if (l == 2 * @W@) LEAF_VEC_@S@(vec_@S@, @W@, 2);
    else if (l == 4 * @W@) LEAF_VEC_@S@(vec_@S@, @W@, 4);
    else {  /* any width: four partial sums per hidden unit */
        @T@ c[4 * @LMAX@];
        for (int64_t k = 0; k < 4 * l; k++) c[k] = 0;
        int64_t i = 0;
        for (; i + 4 <= in; i += 4)
            for (int64_t k = 0; k < l; k++) {
                c[k] += x[i] * w1[i * l + k];
                c[l + k] += x[i + 1] * w1[(i + 1) * l + k];
                c[2 * l + k] += x[i + 2] * w1[(i + 2) * l + k];
                c[3 * l + k] += x[i + 3] * w1[(i + 3) * l + k];
            }
        for (; i < in; i++)
            for (int64_t k = 0; k < l; k++) c[k] += x[i] * w1[i * l + k];
        for (int64_t k = 0; k < l; k++) hid[k] = (c[k] + c[l + k]) + (c[2 * l + k] + c[3 * l + k]);
    }
    const @T@ *b1 = J->b1 + leaf * l;
    for (int64_t k = 0; k < l; k++) hid[k] = act_@S@(b1[k] + hid[k], J->act);
    if (J->h) {  /* stop after the hidden layer (activation applied outside) */
        for (int64_t k = 0; k < l; k++) J->h[b * l + k] = hid[k];
        return;
    }
    out_@S@(hid, J->w2 + leaf * l * out, J->b2 + leaf * out, J->y + b * out, l, out);
}

static void route_@S@(const job_@S@ *J) {  /* the leaf of each sample in [lo, hi), batch order */
    const int64_t in = J->in, first_leaf = (((int64_t)1) << J->depth) - 1;
    int64_t b = J->lo;
    for (; b + 4 <= J->hi; b += 4) {  /* four samples at a time: independent chains */
        const @T@ *xs[4] = {J->x + b * in, J->x + (b + 1) * in, J->x + (b + 2) * in, J->x + (b + 3) * in};
        int64_t node[4] = {0, 0, 0, 0};
        for (int64_t lev = 0; lev < J->depth; lev++) {
            const @T@ *ws[4] = {J->nw + node[0] * in, J->nw + node[1] * in, J->nw + node[2] * in, J->nw + node[3] * in};
            @T@ z[4];
            dot4_@S@(ws, xs, in, z);
            for (int j = 0; j < 4; j++) node[j] = 2 * node[j] + 1 + (z[j] >= -J->nb[node[j]]);
        }
        for (int j = 0; j < 4; j++) J->leaves[b + j] = node[j] - first_leaf;
    }
    for (; b < J->hi; b++) {
        const @T@ *x = J->x + b * in;
        int64_t node = 0;
        for (int64_t lev = 0; lev < J->depth; lev++) {
            @T@ z = dot_@S@(J->nw + node * in, x, in);
            node = 2 * node + 1 + (z >= -J->nb[node]);
        }
        J->leaves[b] = node - first_leaf;
    }
}

/* This chunk's samples in leaf order (counting sort), so that samples sharing a leaf run
   back to back and its weights are read from memory once. NULL: keep batch order (when
   leaves far outnumber samples, or out of memory). */
static int64_t *leaf_order_@S@(const job_@S@ *J) {
    const int64_t n = J->hi - J->lo, L = ((int64_t)1) << J->depth;
    if (n < 2 || L < 2 || L > 4 * n) return 0;
    int64_t *buf = (int64_t *)malloc((size_t)(n + L + 1) * sizeof(int64_t));
    if (!buf) return 0;
    int64_t *order = buf, *counts = buf + n;
    for (int64_t j = 0; j <= L; j++) counts[j] = 0;
    for (int64_t b = J->lo; b < J->hi; b++) counts[J->leaves[b] + 1]++;
    for (int64_t j = 0; j < L; j++) counts[j + 1] += counts[j];
    for (int64_t b = J->lo; b < J->hi; b++) order[counts[J->leaves[b]]++] = b;
    return buf;
}

static void *run_@S@(void *arg) {
    job_@S@ *J = (job_@S@ *)arg;
    const int64_t l = J->l, out = J->out;
    if (J->phase != 2) {
        if (J->depth == 0) for (int64_t b = J->lo; b < J->hi; b++) J->leaves[b] = 0;
        else route_@S@(J);
        if (J->phase == 0) return 0;
    }
    int64_t *order = leaf_order_@S@(J);
    for (int64_t s = 0; s < J->hi - J->lo; s++) {
        const int64_t b = order ? order[s] : J->lo + s;
        if (J->phase == 2) {  /* second half: y = b2 + a @ w2 for activations computed outside */
            const int64_t leaf = J->leaves[b];
            out_@S@(J->h + b * l, J->w2 + leaf * l * out, J->b2 + leaf * out, J->y + b * out, l, out);
            continue;
        }
        switch (l) {  /* constant leaf widths unroll fully */
            case 1: leaf_@S@(J, b, 1); break;
            case 2: leaf_@S@(J, b, 2); break;
            case 4: leaf_@S@(J, b, 4); break;
            case 8: leaf_@S@(J, b, 8); break;
            case 16: leaf_@S@(J, b, 16); break;
            case 32: leaf_@S@(J, b, 32); break;
            default: leaf_@S@(J, b, l);
        }
    }
    free(order);
    return 0;
}

/* mode 0: route only (leaves out); mode 1: route, then each sample's leaf -> y (activation
   `act` fused; with h != NULL the hidden activations go to h and y is not written);
   mode 2: y from the activations h and the leaves (second half). Batches are split into
   nthreads contiguous chunks, one POSIX thread each (the caller's thread takes the first). */
int fff_hard_@S@(const @T@ *x, int64_t B, int64_t in, int64_t l, int64_t out, int64_t depth,
                 const @T@ *nw, const @T@ *nb, const @T@ *w1, const @T@ *b1, const @T@ *w2, const @T@ *b2,
                 int act, int mode, @T@ *y, @T@ *h, int64_t *leaves, int nthreads) {
    if (l > @LMAX@ || l < 1 || depth < 0 || depth > 40) return -1;
    const int64_t cap = B / 16 > 1 ? B / 16 : 1;  /* at least 16 samples per thread */
    if (nthreads > 64) nthreads = 64;
    if (nthreads < 1) nthreads = 1;
    if ((int64_t)nthreads > cap) nthreads = (int)cap;
    job_@S@ jobs[64];
    for (int t = 0; t < nthreads; t++) {
        job_@S@ J = {x, nw, nb, w1, b1, w2, b2, y, h, leaves, 0, B * t / nthreads, B * (t + 1) / nthreads,
                     in, l, out, depth, act, mode};
        jobs[t] = J;
    }
#ifdef _OPENMP
    /* torch's own OpenMP runtime (libgomp.so.1 is already loaded by torch, so the loader binds this
       library to it): the chunks run on torch's worker threads, which after a torch op are still
       spinning, instead of on fresh threads that would fight them for the cores */
    #pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) run_@S@(&jobs[t]);
#else
    pthread_t tid[64];
    int started[64] = {0};
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tid[t], 0, run_@S@, &jobs[t]) == 0;
    run_@S@(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tid[t], 0);
        else run_@S@(&jobs[t]);
    }
#endif
    return 0;
}
"""

# Vector width in elements: one register of the widest ISA the compiler targets (16 float32 with
# AVX-512, 8 with AVX2, 4 otherwise), so the kernels' accumulators fit the register file (a
# 64-byte vector on a 16-register AVX2 machine spilled: routing ran at a fifth of its speed).
_HEADER = r"""#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <pthread.h>
#if defined(__AVX512F__)
#define VW_f32 16
#elif defined(__AVX__)
#define VW_f32 8
#else
#define VW_f32 4
#endif
#define VW_f64 (VW_f32 / 2)
int fff_vector_width_f32(void) { return VW_f32; }
"""
SOURCE = _HEADER + "".join(
    _TEMPLATE.replace("@T@", t).replace("@S@", s).replace("@W@", f"VW_{s}").replace("@ERF@", e)
    .replace("@LMAX@", str(MAX_LEAF_WIDTH))
    for t, s, e in (("float", "f32", "erff"), ("double", "f64", "erf")))

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

    return (sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
            and (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists())


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    cache = Path(os.environ.get("TOPOTORCH_CACHE", Path.home() / ".cache" / "topotorch")) / "kernels"
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256("\n".join([SOURCE, cc, " ".join(flags), _cpu_signature(), sys.platform]).encode()).hexdigest()[:16]
        so = cache / f"fff_cpu_{key}.so"
        if so.exists():
            break
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, tmp_so = Path(tmp) / "fff_cpu.c", Path(tmp) / "fff_cpu.so"
            src.write_text(SOURCE)
            r = subprocess.run([cc, *flags, str(src), "-o", str(tmp_so), "-lm"], capture_output=True, text=True, timeout=120)
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


def hard_forward(x: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, depth: int, act: int, activation=None,
                 route_only: bool = False, need_leaves: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
        rc = fn(x.data_ptr(), B, n_in, l, out, depth, nw.data_ptr(), nb.data_ptr(), None, None, None, None,
                0, 0, None, None, leaves.data_ptr(), nthreads)
        y = None
    else:
        y = torch.empty(B, out, dtype=x.dtype)
        h = torch.empty(B, l, dtype=x.dtype) if act == ACT_NONE else None
        rc = fn(x.data_ptr(), B, n_in, l, out, depth, nw.data_ptr(), nb.data_ptr(), w1.data_ptr(), b1.data_ptr(),
                w2.data_ptr(), b2.data_ptr(), ACT_IDENTITY if h is not None else act, 1, y.data_ptr(),
                h.data_ptr() if h is not None else None, leaves.data_ptr(), nthreads)
        if h is not None and rc == 0:
            a = activation(h).contiguous()
            rc = fn(None, B, n_in, l, out, depth, None, None, None, None, w2.data_ptr(), b2.data_ptr(), 0, 2,
                    y.data_ptr(), a.data_ptr(), leaves.data_ptr(), nthreads)
    if rc != 0:
        raise RuntimeError(f"FFF CPU kernel failed (code {rc})")
    return y, (leaves if need_leaves or route_only else None)
