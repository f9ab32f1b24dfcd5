/* A small C kernel for the FFF hard forward on CPU (see _cpu_kernel.py, its loader, for the idea).
 *
 * Compiled on first use by the loader with the system C compiler and loaded with ctypes; the
 * per-precision code is fff_cpu_impl.h, instantiated here for float and double.
 */
#ifndef FFF_LMAX
#error "compile with -DFFF_LMAX=<widest leaf> (the loader passes MAX_LEAF_WIDTH)"
#endif

/* Vector width in elements: one register of the widest ISA the compiler targets (16 float32 with
 * AVX-512, 8 with AVX2, 4 otherwise), so the kernels' accumulators fit the register file (a
 * 64-byte vector on a 16-register AVX2 machine spilled: routing ran at a fifth of its speed). */
#include <stdint.h>
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

#define FFF_CAT_(a, b) a##_##b
#define FFF_CAT(a, b) FFF_CAT_(a, b)

#define FFF_REAL float
#define FFF_VW VW_f32
#define FFF_ERF erff
#define FFF_NAME(x) FFF_CAT(x, f32)
#include "fff_cpu_impl.h"
#undef FFF_REAL
#undef FFF_VW
#undef FFF_ERF
#undef FFF_NAME

#define FFF_REAL double
#define FFF_VW VW_f64
#define FFF_ERF erf
#define FFF_NAME(x) FFF_CAT(x, f64)
#include "fff_cpu_impl.h"
#undef FFF_REAL
#undef FFF_VW
#undef FFF_ERF
#undef FFF_NAME
