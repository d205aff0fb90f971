/* Sparse cross-layer decoding on the CPU, one pass over each decoder row.
 *
 * Built at first use by clt_lens/clt/cpu_kernels.py (cc -O3 -march=native -shared); the torch
 * implementation in sparse.py is the reference and the fallback.
 *
 * One call handles one source layer: its decoder W [F, row] (row = targets * d, contiguous per
 * feature) and its kept entries in feature-major order (crow [F + 1], tok, vals), the order in
 * which every feature's row is read once for all of its tokens. Output and gradient rows of a
 * token sit `stride` elements apart (the [B, L, d] buffer at the source's first target).
 *
 * Why this beats torch's ops here: the row-major gather (embedding_bag) reads each decoder row
 * once per token that uses it; sampled_addmm, the transposed spmm and the norm gradient's
 * addcmul each stream all of W or dW again. Here the forward reads each row once (and takes its
 * norm on the way), and the backward reads each row once and writes its gradient once, with
 * dL/da and dL/dW from the same gradient rows.
 *
 * Threads: the forward splits the tokens (each thread adds into its own tokens' output rows,
 * walking every feature in order); the backward hands out chunks of features (each feature's
 * dL/da and dL/dW row come from one thread, entries in order). Either way every output element
 * is summed in the same order whatever the thread count, so results are bitwise independent of
 * it. The backward takes four tokens per pass over a gradient row: one read-modify-write of
 * that row per four entries instead of one each (~20% faster here).
 */
#include <pthread.h>
#include <stdint.h>

#define MAX_THREADS 256
#define CHUNK 8

#define DEFINE_KERNELS(T, SFX)                                                                  \
  static inline T dot_##SFX(const T *a, const T *b, int64_t n) {                                \
    T acc[16] = {0};                                                                            \
    int64_t k = 0;                                                                              \
    for (; k + 16 <= n; k += 16)                                                                \
      for (int j = 0; j < 16; j++) acc[j] += a[k + j] * b[k + j];                               \
    T s = 0;                                                                                    \
    for (; k < n; k++) s += a[k] * b[k];                                                        \
    for (int j = 0; j < 16; j++) s += acc[j];                                                   \
    return s;                                                                                   \
  }                                                                                             \
                                                                                                \
  typedef struct {                                                                              \
    int64_t n_features, row, stride, t_lo, t_hi, f_lo, f_hi;                                    \
    const int64_t *crow, *tok;                                                                  \
    const T *vals, *w;                                                                          \
    T *out, *sumsq;                                                                             \
  } fwd_##SFX;                                                                                  \
                                                                                                \
  static void *fwd_worker_##SFX(void *p) {                                                      \
    const fwd_##SFX *A = (const fwd_##SFX *)p;                                                  \
    const int64_t n = A->row;                                                                   \
    for (int64_t f = 0; f < A->n_features; f++) {                                              \
      const T *wr = A->w + f * n;                                                               \
      if (A->sumsq && f >= A->f_lo && f < A->f_hi) A->sumsq[f] = dot_##SFX(wr, wr, n);         \
      for (int64_t e = A->crow[f]; e < A->crow[f + 1]; e++) {                                   \
        const int64_t t = A->tok[e];                                                            \
        const T v = A->vals[e];                                                                 \
        if (t < A->t_lo || t >= A->t_hi || v == 0) continue; /* other thread's, or a kept 0 */ \
        T *o = A->out + t * A->stride;                                                          \
        for (int64_t k = 0; k < n; k++) o[k] += v * wr[k];                                      \
      }                                                                                         \
    }                                                                                           \
    return 0;                                                                                   \
  }                                                                                             \
                                                                                                \
  /* each thread adds into its own tokens' rows of out (zeroed by the caller), in feature      \
     order, so the result does not depend on the thread count; sumsq [F] or NULL */            \
  int clt_decode_forward_##SFX(int64_t n_features, int64_t n_tokens, int64_t row,               \
                               int64_t stride, const int64_t *crow, const int64_t *tok,         \
                               const T *vals, const T *w, T *out, T *sumsq, int n_threads) {    \
    fwd_##SFX A[MAX_THREADS];                                                                   \
    pthread_t th[MAX_THREADS];                                                                  \
    int started = 1, rc = 0;                                                                    \
    if (n_threads < 1 || n_threads > MAX_THREADS) return -1;                                    \
    for (int k = 0; k < n_threads; k++) {                                                       \
      fwd_##SFX a = {n_features, row, stride, n_tokens * k / n_threads,                         \
                     n_tokens * (k + 1) / n_threads, n_features * k / n_threads,                \
                     n_features * (k + 1) / n_threads, crow, tok, vals, w, out, sumsq};         \
      A[k] = a;                                                                                 \
    }                                                                                           \
    for (; started < n_threads; started++)                                                      \
      if (pthread_create(&th[started], 0, fwd_worker_##SFX, &A[started])) break;               \
    for (int k = started; k < n_threads; k++) fwd_worker_##SFX(&A[k]); /* no thread: inline */ \
    fwd_worker_##SFX(&A[0]);                                                                    \
    for (int k = 1; k < started; k++) rc |= pthread_join(th[k], 0);                             \
    return rc;                                                                                  \
  }                                                                                             \
                                                                                                \
  typedef struct {                                                                              \
    int64_t n_features, row, stride, next;                                                      \
    const int64_t *crow, *tok;                                                                  \
    const T *vals, *w, *g, *scale;                                                              \
    T *grad_vals, *grad_w;                                                                      \
  } bwd_##SFX;                                                                                  \
                                                                                                \
  static void *bwd_worker_##SFX(void *p) {                                                      \
    bwd_##SFX *A = (bwd_##SFX *)p;                                                              \
    const int64_t n = A->row;                                                                   \
    for (;;) {                                                                                  \
      const int64_t f0 = __atomic_fetch_add(&A->next, CHUNK, __ATOMIC_RELAXED);                 \
      if (f0 >= A->n_features) break;                                                           \
      const int64_t f1 = f0 + CHUNK < A->n_features ? f0 + CHUNK : A->n_features;               \
      for (int64_t f = f0; f < f1; f++) {                                                       \
        const T *wr = A->w + f * n;                                                             \
        T *gw = A->grad_w ? A->grad_w + f * n : 0;                                              \
        if (gw) { /* the norm's gradient: dL/d|w| * w / |w| */                                  \
          const T s = A->scale ? A->scale[f] : 0;                                               \
          for (int64_t k = 0; k < n; k++) gw[k] = s * wr[k];                                    \
        }                                                                                       \
        int64_t e = A->crow[f];                                                                 \
        const int64_t e_end = A->crow[f + 1];                                                   \
        for (; e + 4 <= e_end; e += 4) { /* four tokens per pass over the row */               \
          const T *g0 = A->g + A->tok[e] * A->stride, *g1 = A->g + A->tok[e + 1] * A->stride;   \
          const T *g2 = A->g + A->tok[e + 2] * A->stride, *g3 = A->g + A->tok[e + 3] * A->stride; \
          const T v0 = A->vals[e], v1 = A->vals[e + 1], v2 = A->vals[e + 2], v3 = A->vals[e + 3]; \
          if (A->grad_vals) {                                                                   \
            A->grad_vals[e] = dot_##SFX(wr, g0, n);                                             \
            A->grad_vals[e + 1] = dot_##SFX(wr, g1, n);                                         \
            A->grad_vals[e + 2] = dot_##SFX(wr, g2, n);                                         \
            A->grad_vals[e + 3] = dot_##SFX(wr, g3, n);                                         \
          }                                                                                     \
          if (gw)                                                                               \
            for (int64_t k = 0; k < n; k++)                                                     \
              gw[k] += ((v0 * g0[k] + v1 * g1[k]) + (v2 * g2[k] + v3 * g3[k]));                 \
        }                                                                                       \
        for (; e < e_end; e++) {                                                                \
          const T *gr = A->g + A->tok[e] * A->stride;                                           \
          if (A->grad_vals) A->grad_vals[e] = dot_##SFX(wr, gr, n);                             \
          const T v = A->vals[e];                                                               \
          if (gw && v != 0)                                                                     \
            for (int64_t k = 0; k < n; k++) gw[k] += v * gr[k];                                 \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
    return 0;                                                                                   \
  }                                                                                             \
                                                                                                \
  /* grad_vals [nnz] and grad_w [F, row] may be NULL (not needed); scale [F] or NULL */        \
  int clt_decode_backward_##SFX(int64_t n_features, int64_t row, int64_t stride,                \
                                const int64_t *crow, const int64_t *tok, const T *vals,         \
                                const T *w, const T *g, const T *scale, T *grad_vals,           \
                                T *grad_w, int n_threads) {                                     \
    bwd_##SFX A = {n_features, row, stride, 0, crow, tok, vals, w, g, scale, grad_vals, grad_w}; \
    pthread_t th[MAX_THREADS];                                                                  \
    int started = 1, rc = 0;                                                                    \
    if (n_threads < 1 || n_threads > MAX_THREADS) return -1;                                    \
    for (; started < n_threads; started++)                                                      \
      if (pthread_create(&th[started], 0, bwd_worker_##SFX, &A)) break;                         \
    bwd_worker_##SFX(&A);                                                                       \
    for (int k = 1; k < started; k++) rc |= pthread_join(th[k], 0);                             \
    return rc;                                                                                  \
  }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

