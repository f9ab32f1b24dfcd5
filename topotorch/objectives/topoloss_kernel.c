/* The TopoLoss CPU kernel (float32 and bfloat16 sheets): loaded by topoloss.py (see its comment
 * "the same two passes as one compiled CPU kernel" for the idea), compiled there on first use. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#define omp_get_thread_num_safe() omp_get_thread_num()
#else
#define omp_get_thread_num_safe() 0
#endif

static inline float bf2f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* row i of S (E values) as float: a pointer into S (float32) or a conversion into buf (bfloat16) */
static inline const float *row_of(const void *S, int bf, int64_t i, int64_t E, float *buf) {
    if (!bf) return (const float *)S + i * E;
    const uint16_t *p = (const uint16_t *)S + i * E;
    #pragma omp simd
    for (int64_t k = 0; k < E; k++) buf[k] = bf2f(p[k]);
    return buf;
}

/* B of unit (r, c) = sum_p sum_q Uh[r,p] Uw[c,q] T[p,q,:] */
static inline void blur_unit(float *restrict out, const float *restrict T, int64_t r, int64_t c, int64_t E, int64_t hp,
                             int64_t wp, const float *Uh, const int32_t *Uh_s, const int32_t *Uh_e,
                             const float *Uw, const int32_t *Uw_s, const int32_t *Uw_e) {
    for (int64_t k = 0; k < E; k++) out[k] = 0.f;
    for (int32_t p = Uh_s[r]; p < Uh_e[r]; p++) {
        float a = Uh[r * hp + p];
        if (a == 0.f) continue;
        for (int32_t q = Uw_s[c]; q < Uw_e[c]; q++) {
            float wgt = a * Uw[c * wp + q];
            if (wgt == 0.f) continue;
            const float *restrict t = T + (p * wp + q) * E;
            #pragma omp simd
            for (int64_t k = 0; k < E; k++) out[k] += wgt * t[k];
        }
    }
}

/* One sheet S (h, w, E) of float32 (bf = 0) or bfloat16 (bf = 1). Returns the loss 1 - mean cos in *loss;
   if grad != NULL writes d(coef * loss)/dS there (same dtype as S). Operators are dense row-major with the
   [start, end) span of non-zero columns of every row; DhT/DwT spans index the columns of Dh/Dw. */
int topo_sheet(const void *S, int bf, int64_t h, int64_t w, int64_t E, int64_t hp, int64_t wp,
               const float *Dh, const int32_t *Dh_s, const int32_t *Dh_e,
               const float *Dw, const int32_t *Dw_s, const int32_t *Dw_e,
               const float *Uh, const int32_t *Uh_s, const int32_t *Uh_e,
               const float *Uw, const int32_t *Uw_s, const int32_t *Uw_e,
               const int32_t *DhT_s, const int32_t *DhT_e, const int32_t *DwT_s, const int32_t *DwT_e,
               double coef, float eps, void *grad, double *loss, int nthreads) {
    int64_t N = h * w, small = hp * wp * E;
    if (nthreads < 1) nthreads = 1;
    float *T = (float *)malloc(sizeof(float) * small);
    double *cosv = (double *)malloc(sizeof(double) * N);
    float *coefs = grad ? (float *)malloc(sizeof(float) * 2 * N) : NULL;
    float *G = grad ? (float *)calloc((size_t)small * nthreads, sizeof(float)) : NULL;
    float *bufs = (float *)malloc(sizeof(float) * 3 * E * nthreads);
    if (!T || !cosv || !bufs || (grad && (!coefs || !G))) { free(T); free(cosv); free(coefs); free(G); free(bufs); return 1; }
    float g = (float)(-coef / (double)N);

    /* 1. T = Dh S Dw^T (h' x w' x E), reading only the rows and columns the down step samples */
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t pq = 0; pq < hp * wp; pq++) {
        int64_t p = pq / wp, q = pq % wp;
        float *restrict t = T + pq * E;
        float *buf = bufs + 3 * E * omp_get_thread_num_safe();
        for (int64_t k = 0; k < E; k++) t[k] = 0.f;
        for (int32_t j = Dh_s[p]; j < Dh_e[p]; j++) {
            float a = Dh[p * h + j];
            if (a == 0.f) continue;
            for (int32_t c = Dw_s[q]; c < Dw_e[q]; c++) {
                float wgt = a * Dw[q * w + c];
                if (wgt == 0.f) continue;
                const float *restrict s = row_of(S, bf, j * w + c, E, buf);
                #pragma omp simd
                for (int64_t k = 0; k < E; k++) t[k] += wgt * s[k];
            }
        }
    }

    /* 2. per unit: <S,B>, |S|, |B| -> cos; with a gradient, G += Uh^T (inv S + beta B) Uw per thread */
    #pragma omp parallel num_threads(nthreads)
    {
        int tid = omp_get_thread_num_safe();
        float *sbuf = bufs + 3 * E * tid, *b = sbuf + E;
        float *Gt = G ? G + small * tid : NULL;
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < N; u++) {
            int64_t r = u / w, c = u % w;
            const float *restrict s = row_of(S, bf, u, E, sbuf);
            blur_unit(b, T, r, c, E, hp, wp, Uh, Uh_s, Uh_e, Uw, Uw_s, Uw_e);
            float d = 0.f, ss = 0.f, bb = 0.f;
            #pragma omp simd reduction(+:d, ss, bb)
            for (int64_t k = 0; k < E; k++) { d += s[k] * b[k]; ss += s[k] * s[k]; bb += b[k] * b[k]; }
            float ns = fmaxf(sqrtf(ss), eps), nb = fmaxf(sqrtf(bb), eps);
            float cs = d / (ns * nb);
            cosv[u] = cs;
            if (Gt) {
                float inv = g / (ns * nb), cg = g * cs, beta = -cg / (nb * nb);
                coefs[2 * u] = inv;
                coefs[2 * u + 1] = -cg / (ns * ns);
                for (int64_t k = 0; k < E; k++) b[k] = inv * s[k] + beta * b[k];   /* b now holds G_B */
                for (int32_t p = Uh_s[r]; p < Uh_e[r]; p++) {
                    float a = Uh[r * hp + p];
                    if (a == 0.f) continue;
                    for (int32_t q = Uw_s[c]; q < Uw_e[c]; q++) {
                        float wgt = a * Uw[c * wp + q];
                        if (wgt == 0.f) continue;
                        float *restrict gt = Gt + (p * wp + q) * E;
                        #pragma omp simd
                        for (int64_t k = 0; k < E; k++) gt[k] += wgt * b[k];
                    }
                }
            }
        }
    }
    double tot = 0;
    for (int64_t u = 0; u < N; u++) tot += cosv[u];
    *loss = 1.0 - tot / (double)N;

    if (grad) {
        /* sum the per-thread G's into the first */
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < small; i++) {
            float acc = G[i];
            for (int t = 1; t < nthreads; t++) acc += G[small * t + i];
            G[i] = acc;
        }
        /* 3. per unit: dS = inv B + delta S + sum Dh[p,r] Dw[q,c] G[p,q] */
        #pragma omp parallel num_threads(nthreads)
        {
            int tid = omp_get_thread_num_safe();
            float *sbuf = bufs + 3 * E * tid, *b = sbuf + E, *o = b + E;
            #pragma omp for schedule(static)
            for (int64_t u = 0; u < N; u++) {
                int64_t r = u / w, c = u % w;
                const float *restrict s = row_of(S, bf, u, E, sbuf);
                blur_unit(b, T, r, c, E, hp, wp, Uh, Uh_s, Uh_e, Uw, Uw_s, Uw_e);
                float inv = coefs[2 * u], delta = coefs[2 * u + 1];
                float *restrict out = bf ? o : (float *)grad + u * E;
                #pragma omp simd
                for (int64_t k = 0; k < E; k++) out[k] = inv * b[k] + delta * s[k];
                for (int32_t p = DhT_s[r]; p < DhT_e[r]; p++) {
                    float a = Dh[p * h + r];
                    if (a == 0.f) continue;
                    for (int32_t q = DwT_s[c]; q < DwT_e[c]; q++) {
                        float wgt = a * Dw[q * w + c];
                        if (wgt == 0.f) continue;
                        const float *restrict gt = G + (p * wp + q) * E;
                        #pragma omp simd
                        for (int64_t k = 0; k < E; k++) out[k] += wgt * gt[k];
                    }
                }
                if (bf) {
                    uint16_t *dst = (uint16_t *)grad + u * E;
                    for (int64_t k = 0; k < E; k++) dst[k] = f2bf(o[k]);
                }
            }
        }
    }
    free(T); free(cosv); free(coefs); free(G); free(bufs);
    return 0;
}
