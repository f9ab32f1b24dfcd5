/* The FFF hard forward for one precision, included twice by fff_cpu.c (float and double).
 *
 * Before each inclusion fff_cpu.c defines FFF_REAL (the element type), FFF_VW (its vector width in
 * elements), FFF_ERF (erff or erf) and FFF_NAME(x) (x suffixed with the precision: run_f32 ...);
 * FFF_LMAX (the widest leaf) comes from the compiler command line, so it has one home: the loader's
 * MAX_LEAF_WIDTH. The macros this file defines are undefined at its end for the next inclusion.
 */
/* ---- one precision: REAL = FFF_REAL, vectors of FFF_VW ------------------------------------------------------- */
typedef FFF_REAL FFF_NAME(vec) __attribute__((vector_size(FFF_VW * sizeof(FFF_REAL)), aligned(sizeof(FFF_REAL))));
typedef FFF_REAL FFF_NAME(vech) __attribute__((vector_size(FFF_VW / 2 * sizeof(FFF_REAL)), aligned(sizeof(FFF_REAL))));
#define LD(p) (*(const FFF_NAME(vec) *)(p))

static inline FFF_REAL FFF_NAME(hsum)(FFF_NAME(vec) v) {
    FFF_REAL s = 0;
    for (int j = 0; j < FFF_VW; j++) s += v[j];
    return s;
}

/* Every routing dot product sums in the same order (two vector chains, then the scalar tail),
   alone (dot_) or four samples interleaved (dot4_), so a sample takes the same path and gets
   the same output alone or anywhere in a batch. */
static inline FFF_REAL FFF_NAME(dot)(const FFF_REAL *restrict a, const FFF_REAL *restrict b, int64_t n) {
    FFF_NAME(vec) s0 = {0}, s1 = {0};
    int64_t i = 0;
    for (; i + 2 * FFF_VW <= n; i += 2 * FFF_VW) {
        s0 += LD(a + i) * LD(b + i);
        s1 += LD(a + i + FFF_VW) * LD(b + i + FFF_VW);
    }
    FFF_REAL s = FFF_NAME(hsum)(s0 + s1);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* four independent dot products (four samples' routing at one level), two chains each, in
   dot_'s order */
static inline void FFF_NAME(dot4)(const FFF_REAL *const *w, const FFF_REAL *const *x, int64_t n, FFF_REAL *z) {
    FFF_NAME(vec) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    int64_t i = 0;
    for (; i + 2 * FFF_VW <= n; i += 2 * FFF_VW) {
        a0 += LD(w[0] + i) * LD(x[0] + i);
        a1 += LD(w[1] + i) * LD(x[1] + i);
        a2 += LD(w[2] + i) * LD(x[2] + i);
        a3 += LD(w[3] + i) * LD(x[3] + i);
        b0 += LD(w[0] + i + FFF_VW) * LD(x[0] + i + FFF_VW);
        b1 += LD(w[1] + i + FFF_VW) * LD(x[1] + i + FFF_VW);
        b2 += LD(w[2] + i + FFF_VW) * LD(x[2] + i + FFF_VW);
        b3 += LD(w[3] + i + FFF_VW) * LD(x[3] + i + FFF_VW);
    }
    z[0] = FFF_NAME(hsum)(a0 + b0); z[1] = FFF_NAME(hsum)(a1 + b1); z[2] = FFF_NAME(hsum)(a2 + b2); z[3] = FFF_NAME(hsum)(a3 + b3);
    for (; i < n; i++)
        for (int j = 0; j < 4; j++) z[j] += w[j][i] * x[j][i];
}

static inline FFF_REAL FFF_NAME(act)(FFF_REAL v, int act) {
    if (act == 1) return v > 0 ? v : 0;
    if (act == 2) return (FFF_REAL)0.5 * v * ((FFF_REAL)1 + FFF_ERF(v * (FFF_REAL)0.70710678118654752440));
    return v;
}

typedef struct {
    const FFF_REAL *x, *nw, *nb, *w1, *b1, *w2, *b2;
    FFF_REAL *y, *h;
    int64_t *leaves;
    const int64_t *order;
    int64_t lo, hi, in, l, out, depth;
    int act, phase;
} FFF_NAME(job);

/* y = b2 + a @ w2 (a: l values, w2: l x out). Rows of w2 whose activation is exactly 0 (ReLU
   zeros) are not read: half the second layer's memory traffic at typical ReLU sparsity. */
static inline __attribute__((always_inline)) void FFF_NAME(out)(const FFF_REAL *restrict a, const FFF_REAL *restrict w2,
                                                          const FFF_REAL *restrict b2, FFF_REAL *restrict y,
                                                          const int64_t l, const int64_t out) {
    const FFF_REAL *rows[FFF_LMAX];
    FFF_REAL av[FFF_LMAX];
    int64_t m = 0;
    for (int64_t k = 0; k < l; k++)
        if (a[k] != 0) { rows[m] = w2 + k * out; av[m] = a[k]; m++; }
    int64_t o = 0;
    for (; o + FFF_VW <= out; o += FFF_VW) {
        FFF_NAME(vec) v = LD(b2 + o);
        for (int64_t j = 0; j < m; j++) v += av[j] * LD(rows[j] + o);
        *(FFF_NAME(vec) *)(y + o) = v;
    }
    for (; o < out; o++) {
        FFF_REAL v = b2[o];
        for (int64_t j = 0; j < m; j++) v += av[j] * rows[j][o];
        y[o] = v;
    }
}

/* h = x @ w1 for a leaf width l that is a multiple of the vector width (NV vectors per row) */
#define LEAF_VEC(VT, VW, NV)                                                                   \
    do {                                                                                     \
        VT c0[NV], c1[NV], c2[NV], c3[NV], c4[NV], c5[NV], c6[NV], c7[NV];              \
        for (int v = 0; v < NV; v++)                                                         \
            c0[v] = c1[v] = c2[v] = c3[v] = c4[v] = c5[v] = c6[v] = c7[v] = (VT){0};    \
        int64_t i = 0;                                                                       \
        for (; i + 8 <= in; i += 8) {                                                        \
            const FFF_REAL *w = w1 + i * l;                                                       \
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

static inline __attribute__((always_inline)) void FFF_NAME(leaf)(const FFF_NAME(job) *J, int64_t b, const int64_t l) {
    const int64_t in = J->in, out = J->out, leaf = J->leaves[b];
    const FFF_REAL *restrict x = J->x + b * in, *restrict w1 = J->w1 + leaf * in * l;
    FFF_REAL hid[FFF_LMAX];
    if (l == FFF_VW / 2) LEAF_VEC(FFF_NAME(vech), FFF_VW / 2, 1);
    else if (l == FFF_VW) LEAF_VEC(FFF_NAME(vec), FFF_VW, 1);
    else if (l == 2 * FFF_VW) LEAF_VEC(FFF_NAME(vec), FFF_VW, 2);
    else if (l == 4 * FFF_VW) LEAF_VEC(FFF_NAME(vec), FFF_VW, 4);
    else {  /* any width: four partial sums per hidden unit */
        FFF_REAL c[4 * FFF_LMAX];
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
    const FFF_REAL *b1 = J->b1 + leaf * l;
    for (int64_t k = 0; k < l; k++) hid[k] = FFF_NAME(act)(b1[k] + hid[k], J->act);
    if (J->h) {  /* stop after the hidden layer (activation applied outside) */
        for (int64_t k = 0; k < l; k++) J->h[b * l + k] = hid[k];
        return;
    }
    FFF_NAME(out)(hid, J->w2 + leaf * l * out, J->b2 + leaf * out, J->y + b * out, l, out);
}

static void FFF_NAME(route)(const FFF_NAME(job) *J) {  /* the leaf of each sample in [lo, hi), batch order */
    const int64_t in = J->in, first_leaf = (((int64_t)1) << J->depth) - 1;
    int64_t b = J->lo;
    for (; b + 4 <= J->hi; b += 4) {  /* four samples at a time: independent chains */
        const FFF_REAL *xs[4] = {J->x + b * in, J->x + (b + 1) * in, J->x + (b + 2) * in, J->x + (b + 3) * in};
        int64_t node[4] = {0, 0, 0, 0};
        for (int64_t lev = 0; lev < J->depth; lev++) {
            const FFF_REAL *ws[4] = {J->nw + node[0] * in, J->nw + node[1] * in, J->nw + node[2] * in, J->nw + node[3] * in};
            FFF_REAL z[4];
            FFF_NAME(dot4)(ws, xs, in, z);
            for (int j = 0; j < 4; j++) node[j] = 2 * node[j] + 1 + (z[j] >= -J->nb[node[j]]);
        }
        for (int j = 0; j < 4; j++) J->leaves[b + j] = node[j] - first_leaf;
    }
    for (; b < J->hi; b++) {
        const FFF_REAL *x = J->x + b * in;
        int64_t node = 0;
        for (int64_t lev = 0; lev < J->depth; lev++) {
            FFF_REAL z = FFF_NAME(dot)(J->nw + node * in, x, in);
            node = 2 * node + 1 + (z >= -J->nb[node]);
        }
        J->leaves[b] = node - first_leaf;
    }
}

/* This chunk's samples in leaf order (counting sort), so that samples sharing a leaf run
   back to back and its weights are read from memory once. NULL: keep batch order (when
   leaves far outnumber samples, or out of memory). */
static int64_t *FFF_NAME(leaf_order)(const FFF_NAME(job) *J) {
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

static void *FFF_NAME(run)(void *arg) {
    FFF_NAME(job) *J = (FFF_NAME(job) *)arg;
    const int64_t l = J->l, out = J->out;
    if (J->phase != 2) {
        if (J->depth == 0) for (int64_t b = J->lo; b < J->hi; b++) J->leaves[b] = 0;
        else FFF_NAME(route)(J);
        if (J->phase == 0) return 0;
    }
    int64_t *order = FFF_NAME(leaf_order)(J);
    for (int64_t s = 0; s < J->hi - J->lo; s++) {
        const int64_t b = order ? order[s] : J->lo + s;
        if (J->phase == 2) {  /* second half: y = b2 + a @ w2 for activations computed outside */
            const int64_t leaf = J->leaves[b];
            FFF_NAME(out)(J->h + b * l, J->w2 + leaf * l * out, J->b2 + leaf * out, J->y + b * out, l, out);
            continue;
        }
        switch (l) {  /* constant leaf widths unroll fully */
            case 1: FFF_NAME(leaf)(J, b, 1); break;
            case 2: FFF_NAME(leaf)(J, b, 2); break;
            case 4: FFF_NAME(leaf)(J, b, 4); break;
            case 8: FFF_NAME(leaf)(J, b, 8); break;
            case 16: FFF_NAME(leaf)(J, b, 16); break;
            case 32: FFF_NAME(leaf)(J, b, 32); break;
            default: FFF_NAME(leaf)(J, b, l);
        }
    }
    free(order);
    return 0;
}

/* mode 0: route only (leaves out); mode 1: route, then each sample's leaf -> y (activation
   `act` fused; with h != NULL the hidden activations go to h and y is not written);
   mode 2: y from the activations h and the leaves (second half). Batches are split into
   nthreads contiguous chunks, one POSIX thread each (the caller's thread takes the first). */
int FFF_NAME(fff_hard)(const FFF_REAL *x, int64_t B, int64_t in, int64_t l, int64_t out, int64_t depth,
                 const FFF_REAL *nw, const FFF_REAL *nb, const FFF_REAL *w1, const FFF_REAL *b1, const FFF_REAL *w2, const FFF_REAL *b2,
                 int act, int mode, FFF_REAL *y, FFF_REAL *h, int64_t *leaves, int nthreads) {
    if (l > FFF_LMAX || l < 1 || depth < 0 || depth > 40) return -1;
    const int64_t cap = B / 16 > 1 ? B / 16 : 1;  /* at least 16 samples per thread */
    if (nthreads > 64) nthreads = 64;
    if (nthreads < 1) nthreads = 1;
    if ((int64_t)nthreads > cap) nthreads = (int)cap;
    FFF_NAME(job) jobs[64];
    for (int t = 0; t < nthreads; t++) {
        FFF_NAME(job) J = {x, nw, nb, w1, b1, w2, b2, y, h, leaves, 0, B * t / nthreads, B * (t + 1) / nthreads,
                     in, l, out, depth, act, mode};
        jobs[t] = J;
    }
#ifdef _OPENMP
    /* torch's own OpenMP runtime (libgomp.so.1 is already loaded by torch, so the loader binds this
       library to it): the chunks run on torch's worker threads, which after a torch op are still
       spinning, instead of on fresh threads that would fight them for the cores */
    #pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) FFF_NAME(run)(&jobs[t]);
#else
    pthread_t tid[64];
    int started[64] = {0};
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tid[t], 0, FFF_NAME(run), &jobs[t]) == 0;
    FFF_NAME(run)(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tid[t], 0);
        else FFF_NAME(run)(&jobs[t]);
    }
#endif
    return 0;
}

#undef LD
#undef LEAF_VEC
