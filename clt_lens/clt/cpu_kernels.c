/* The sparse training step's CPU kernels: cross-layer decoding (one pass over each decoder
 * row, forward and backward), the encoder's weight and bias gradients, and the support of a
 * threshold rule (JumpReLU, ReLU). Each is described where it is defined; the notes below are
 * the decoder's.
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
 * that row per four entries instead of one each (~20% faster here). It sums each feature's
 * dL/dW row in a buffer of its own, takes the row's sum of squares there (the clipping norm's
 * share of dW, so that it need not read dW again) and streams the row out with non-temporal
 * stores (dW is not read again until the optimizer's pass).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define MAX_THREADS 256
#define CHUNK 8

/* Runs fn(args + k * size) once for every k < n (size 0: every call gets args itself). Built
 * with OpenMP, on the threads of the OpenMP runtime already loaded, which is torch's (its
 * libgomp.so.1 answers this library's need for one): torch's workers, still spinning after
 * its last op, take the work at once, where threads of our own would share the cores with
 * them meanwhile. Without OpenMP, on pthreads. Returns nonzero where a thread did not start. */
static int run_workers(void *(*fn)(void *), void *args, size_t size, int n) {
  char *base = (char *)args;
#if defined(_OPENMP)
#pragma omp parallel num_threads(n)
  for (int k = omp_get_thread_num(); k < n; k += omp_get_num_threads()) fn(base + k * size);
  return 0;
#else
  pthread_t th[MAX_THREADS];
  int started = 1, rc = 0;
  for (; started < n; started++)
    if (pthread_create(&th[started], 0, fn, base + started * size)) break;
  for (int k = started; k < n; k++) fn(base + k * size); /* no thread: inline */
  fn(base);
  for (int k = 1; k < started; k++) rc |= pthread_join(th[k], 0);
  return rc;
#endif
}

/* Whether this build runs its threads through OpenMP (1) or pthreads (0). */
int clt_openmp(void) {
#if defined(_OPENMP)
  return 1;
#else
  return 0;
#endif
}

/* Copies a gradient row out, with non-temporal stores where dst is 32-byte aligned: the row
 * is not read again until the optimizer's pass, and ordinary stores would first read each
 * line from memory. */
static inline void stream_bytes(void *restrict dst, const void *restrict src, size_t bytes) {
  char *d = (char *)dst;
  const char *s = (const char *)src;
  size_t k = 0;
#if defined(__AVX__)
  if (((uintptr_t)d & 31) == 0)
    for (; k + 32 <= bytes; k += 32)
      _mm256_stream_si256((__m256i *)(d + k), _mm256_loadu_si256((const __m256i *)(s + k)));
#endif
  memcpy(d + k, s + k, bytes - k);
}

static inline void store_fence(void) {
#if defined(__AVX__)
  _mm_sfence(); /* non-temporal stores are visible to other threads after this */
#endif
}

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
  /* out[j] = w . gj for four gradient rows, and gw += sum_j vj * gj, in one pass over them */ \
  static inline void dot4_axpy4_##SFX(const T *restrict w, const T *restrict g0,               \
                                      const T *restrict g1, const T *restrict g2,               \
                                      const T *restrict g3, T v0, T v1, T v2, T v3,             \
                                      T *restrict gw, int64_t n, T *restrict out) {             \
    T a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};                                   \
    int64_t k = 0;                                                                              \
    for (; k + 16 <= n; k += 16)                                                                \
      for (int j = 0; j < 16; j++) {                                                            \
        const T x0 = g0[k + j], x1 = g1[k + j], x2 = g2[k + j], x3 = g3[k + j], wk = w[k + j];  \
        a0[j] += wk * x0;                                                                       \
        a1[j] += wk * x1;                                                                       \
        a2[j] += wk * x2;                                                                       \
        a3[j] += wk * x3;                                                                       \
        gw[k + j] += ((v0 * x0 + v1 * x1) + (v2 * x2 + v3 * x3));                               \
      }                                                                                         \
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                           \
    for (; k < n; k++) {                                                                        \
      const T x0 = g0[k], x1 = g1[k], x2 = g2[k], x3 = g3[k];                                   \
      s0 += w[k] * x0;                                                                          \
      s1 += w[k] * x1;                                                                          \
      s2 += w[k] * x2;                                                                          \
      s3 += w[k] * x3;                                                                          \
      gw[k] += ((v0 * x0 + v1 * x1) + (v2 * x2 + v3 * x3));                                     \
    }                                                                                           \
    for (int j = 0; j < 16; j++) {                                                              \
      s0 += a0[j];                                                                              \
      s1 += a1[j];                                                                              \
      s2 += a2[j];                                                                              \
      s3 += a3[j];                                                                              \
    }                                                                                           \
    out[0] = s0;                                                                                \
    out[1] = s1;                                                                                \
    out[2] = s2;                                                                                \
    out[3] = s3;                                                                                \
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
      const T *restrict wr = A->w + f * n;                                                      \
      if (A->sumsq && f >= A->f_lo && f < A->f_hi) A->sumsq[f] = dot_##SFX(wr, wr, n);         \
      for (int64_t e = A->crow[f]; e < A->crow[f + 1]; e++) {                                   \
        const int64_t t = A->tok[e];                                                            \
        const T v = A->vals[e];                                                                 \
        if (t < A->t_lo || t >= A->t_hi || v == 0) continue; /* other thread's, or a kept 0 */ \
        T *restrict o = A->out + t * A->stride;                                                 \
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
    if (n_threads < 1 || n_threads > MAX_THREADS) return -1;                                    \
    for (int k = 0; k < n_threads; k++) {                                                       \
      fwd_##SFX a = {n_features, row, stride, n_tokens * k / n_threads,                         \
                     n_tokens * (k + 1) / n_threads, n_features * k / n_threads,                \
                     n_features * (k + 1) / n_threads, crow, tok, vals, w, out, sumsq};         \
      A[k] = a;                                                                                 \
    }                                                                                           \
    return run_workers(fwd_worker_##SFX, A, sizeof(A[0]), n_threads);                           \
  }                                                                                             \
                                                                                                \
  typedef struct {                                                                              \
    int64_t n_features, row, stride, next;                                                      \
    const int64_t *crow, *tok;                                                                  \
    const T *vals, *w, *g, *scale;                                                              \
    T *grad_vals, *grad_w, *grad_sumsq;                                                         \
    int failed;                                                                                 \
  } bwd_##SFX;                                                                                  \
                                                                                                \
  static void *bwd_worker_##SFX(void *p) {                                                      \
    bwd_##SFX *A = (bwd_##SFX *)p;                                                              \
    const int64_t n = A->row;                                                                   \
    const size_t bytes = (sizeof(T) * (size_t)(n > 0 ? n : 1) + 63) / 64 * 64;                 \
    T *buf = 0; /* a feature's dL/dW row, summed here and then streamed out */                 \
    if (A->grad_w && !(buf = (T *)aligned_alloc(64, bytes))) {                                  \
      __atomic_store_n(&A->failed, 1, __ATOMIC_RELAXED);                                        \
      return 0;                                                                                 \
    }                                                                                           \
    for (;;) {                                                                                  \
      const int64_t f0 = __atomic_fetch_add(&A->next, CHUNK, __ATOMIC_RELAXED);                 \
      if (f0 >= A->n_features) break;                                                           \
      const int64_t f1 = f0 + CHUNK < A->n_features ? f0 + CHUNK : A->n_features;               \
      for (int64_t f = f0; f < f1; f++) {                                                       \
        const T *restrict wr = A->w + f * n;                                                    \
        T *restrict gw = buf;                                                                   \
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
          if (A->grad_vals && gw) { /* dots and dL/dW in one pass over the gradient rows */   \
            dot4_axpy4_##SFX(wr, g0, g1, g2, g3, v0, v1, v2, v3, gw, n, A->grad_vals + e);      \
            continue;                                                                           \
          }                                                                                     \
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
          const T *restrict gr = A->g + A->tok[e] * A->stride;                                  \
          if (A->grad_vals) A->grad_vals[e] = dot_##SFX(wr, gr, n);                             \
          const T v = A->vals[e];                                                               \
          if (gw && v != 0)                                                                     \
            for (int64_t k = 0; k < n; k++) gw[k] += v * gr[k];                                 \
        }                                                                                       \
        if (gw) {                                                                               \
          if (A->grad_sumsq) A->grad_sumsq[f] = dot_##SFX(gw, gw, n);                           \
          stream_bytes(A->grad_w + f * n, gw, sizeof(T) * (size_t)n);                           \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
    store_fence();                                                                              \
    free(buf);                                                                                  \
    return 0;                                                                                   \
  }                                                                                             \
                                                                                                \
  /* grad_vals [nnz] and grad_w [F, row] may be NULL (not needed); scale [F] or NULL;         \
     grad_sumsq [F] (or NULL): each row's sum of squares of grad_w, taken while the row is in   \
     cache so that the clipping norm need not read grad_w again. Returns -1 on bad arguments,  \
     -2 when memory ran out. */                                                                 \
  int clt_decode_backward_##SFX(int64_t n_features, int64_t row, int64_t stride,                \
                                const int64_t *crow, const int64_t *tok, const T *vals,         \
                                const T *w, const T *g, const T *scale, T *grad_vals,           \
                                T *grad_w, T *grad_sumsq, int n_threads) {                      \
    bwd_##SFX A = {n_features, row, stride, 0, crow, tok, vals, w, g, scale, grad_vals, grad_w, \
                   grad_w ? grad_sumsq : 0, 0};                                                 \
    if (n_threads < 1 || n_threads > MAX_THREADS) return -1;                                    \
    const int rc = run_workers(bwd_worker_##SFX, &A, 0, n_threads);                             \
    return rc ? rc : (A.failed ? -2 : 0);                                                       \
  }

#define ENC_BLOCK 16 /* features per block: one 64-byte line of an fp32 row of dW_enc */

/* One row's slice of a block of dW_enc: o[j] = acc[j * stride] for j < nb. A full, aligned
 * block goes out with non-temporal stores: the rows of a block lie a page or more apart, so
 * ordinary stores each wait for the line to be read first (about 40% slower here), and dW_enc
 * is not read again until the optimizer's pass. */
static inline void put_block_f32(float *o, const float *acc, int64_t stride, int64_t nb) {
#if defined(__AVX__)
  if (nb == ENC_BLOCK && ((uintptr_t)o & 31) == 0) {
    float tmp[ENC_BLOCK] __attribute__((aligned(32)));
    for (int j = 0; j < ENC_BLOCK; j++) tmp[j] = acc[j * stride];
    for (int j = 0; j < ENC_BLOCK; j += 8) _mm256_stream_ps(o + j, _mm256_load_ps(tmp + j));
    return;
  }
#endif
  for (int64_t j = 0; j < nb; j++) o[j] = acc[j * stride];
}

static inline void put_block_f64(double *o, const double *acc, int64_t stride, int64_t nb) {
#if defined(__AVX__)
  if (nb == ENC_BLOCK && ((uintptr_t)o & 31) == 0) {
    double tmp[ENC_BLOCK] __attribute__((aligned(32)));
    for (int j = 0; j < ENC_BLOCK; j++) tmp[j] = acc[j * stride];
    for (int j = 0; j < ENC_BLOCK; j += 4) _mm256_stream_pd(o + j, _mm256_load_pd(tmp + j));
    return;
  }
#endif
  for (int64_t j = 0; j < nb; j++) o[j] = acc[j * stride];
}

#define DEFINE_ENCODER_KERNEL(T, SFX)                                                          \
  typedef struct {                                                                              \
    int64_t n_features, d, next;                                                                \
    const int64_t *crow, *tok;                                                                  \
    const T *g, *x;                                                                             \
    T *grad_w, *grad_b;                                                                         \
    int failed;                                                                                 \
  } enc_##SFX;                                                                                  \
                                                                                                \
  static void *enc_worker_##SFX(void *p) {                                                      \
    enc_##SFX *A = (enc_##SFX *)p;                                                              \
    const int64_t d = A->d, F = A->n_features;                                                  \
    T *acc = (T *)malloc(sizeof(T) * ENC_BLOCK * (size_t)(d > 0 ? d : 1));                      \
    if (!acc) {                                                                                 \
      __atomic_store_n(&A->failed, 1, __ATOMIC_RELAXED);                                        \
      return 0;                                                                                 \
    }                                                                                           \
    for (;;) {                                                                                  \
      const int64_t f0 = __atomic_fetch_add(&A->next, ENC_BLOCK, __ATOMIC_RELAXED);             \
      if (f0 >= F) break;                                                                       \
      const int64_t nb = f0 + ENC_BLOCK < F ? ENC_BLOCK : F - f0;                               \
      for (int64_t j = 0; j < nb; j++) { /* feature f0 + j's column, summed in entry order */  \
        T *restrict a = acc + j * d;                                                            \
        T gb = 0;                                                                               \
        for (int64_t k = 0; k < d; k++) a[k] = 0;                                               \
        int64_t e = A->crow[f0 + j];                                                            \
        const int64_t e_end = A->crow[f0 + j + 1];                                              \
        for (; e + 4 <= e_end; e += 4) { /* four tokens per pass over the accumulator */       \
          const T v0 = A->g[e], v1 = A->g[e + 1], v2 = A->g[e + 2], v3 = A->g[e + 3];           \
          const T *restrict x0 = A->x + A->tok[e] * d, *restrict x1 = A->x + A->tok[e + 1] * d; \
          const T *restrict x2 = A->x + A->tok[e + 2] * d, *restrict x3 = A->x + A->tok[e + 3] * d; \
          gb += v0;                                                                             \
          gb += v1;                                                                             \
          gb += v2;                                                                             \
          gb += v3;                                                                             \
          for (int64_t k = 0; k < d; k++)                                                       \
            a[k] += ((v0 * x0[k] + v1 * x1[k]) + (v2 * x2[k] + v3 * x3[k]));                    \
        }                                                                                       \
        for (; e < e_end; e++) {                                                                \
          const T v = A->g[e];                                                                  \
          const T *restrict xr = A->x + A->tok[e] * d;                                          \
          gb += v;                                                                              \
          for (int64_t k = 0; k < d; k++) a[k] += v * xr[k];                                    \
        }                                                                                       \
        if (A->grad_b) A->grad_b[f0 + j] = gb;                                                  \
      }                                                                                         \
      if (A->grad_w)                                                                            \
        for (int64_t k = 0; k < d; k++) /* the block's columns of dW_enc [d, F] */             \
          put_block_##SFX(A->grad_w + k * F + f0, acc + k, d, nb);                              \
    }                                                                                           \
    store_fence();                                                                              \
    free(acc);                                                                                  \
    return 0;                                                                                   \
  }                                                                                             \
                                                                                                \
  /* dL/dW_enc [d, F] = x^T G and dL/db_enc [F] of one layer (either NULL: not needed), from G's \
     entries in feature-major order (crow [F + 1], tok, g) and x [B, d]; every element is       \
     written. Blocks of ENC_BLOCK features go to threads whole, each feature's entries summed   \
     in order, so the result does not depend on the thread count. Returns -1 on bad arguments, \
     -2 when memory ran out. */                                                                 \
  int clt_encoder_grad_##SFX(int64_t n_features, int64_t d, const int64_t *crow,                \
                             const int64_t *tok, const T *g, const T *x, T *grad_w, T *grad_b,  \
                             int n_threads) {                                                   \
    enc_##SFX A = {n_features, d, 0, crow, tok, g, x, grad_w, grad_b, 0};                       \
    if (n_threads < 1 || n_threads > MAX_THREADS) return -1;                                    \
    const int rc = run_workers(enc_worker_##SFX, &A, 0, n_threads);                             \
    return rc ? rc : (A.failed ? -2 : 0);                                                       \
  }

/* bit j set where x[j] > c[j], j < n <= 32 */
static inline uint32_t above_bits_f32(const float *x, const float *c, int64_t n) {
  uint32_t bits = 0;
  int64_t j = 0;
#if defined(__AVX__)
  for (; j + 8 <= n; j += 8)
    bits |= (uint32_t)_mm256_movemask_ps(
                _mm256_cmp_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(c + j), _CMP_GT_OQ))
            << j;
#endif
  for (; j < n; j++) bits |= (uint32_t)(x[j] > c[j]) << j;
  return bits;
}

static inline uint32_t above_bits_f64(const double *x, const double *c, int64_t n) {
  uint32_t bits = 0;
  int64_t j = 0;
#if defined(__AVX__)
  for (; j + 4 <= n; j += 4)
    bits |= (uint32_t)_mm256_movemask_pd(
                _mm256_cmp_pd(_mm256_loadu_pd(x + j), _mm256_loadu_pd(c + j), _CMP_GT_OQ))
            << j;
#endif
  for (; j < n; j++) bits |= (uint32_t)(x[j] > c[j]) << j;
  return bits;
}

/* Where pre-activations pass a per-feature cut: the support of a threshold rule (JumpReLU's
 * window, ReLU's zero), in two passes over pre [L*B, F] so that the caller can size the output
 * exactly: one counts each row's kept positions, the other writes them from the row's offset
 * (flat index into [L, B, F], token, feature, layer * F + feature, and the value). Rows are
 * split between threads; every position lands at the same place whatever their number. */
#define DEFINE_SUPPORT_KERNELS(T, SFX)                                                         \
  typedef struct {                                                                              \
    int64_t r_lo, r_hi, batch, F;                                                               \
    const T *pre, *cut;                                                                         \
    int64_t *counts;                                                                            \
    const int64_t *offset;                                                                      \
    int64_t *flat, *tok, *feat, *lf;                                                            \
    T *vals;                                                                                    \
  } above_##SFX;                                                                                \
                                                                                                \
  static void *count_worker_##SFX(void *p) {                                                    \
    const above_##SFX *A = (const above_##SFX *)p;                                              \
    const int64_t F = A->F;                                                                     \
    for (int64_t r = A->r_lo; r < A->r_hi; r++) {                                               \
      const T *x = A->pre + r * F, *c = A->cut + (r / A->batch) * F;                            \
      int64_t n = 0;                                                                            \
      for (int64_t f = 0; f < F; f++) n += x[f] > c[f];                                         \
      A->counts[r] = n;                                                                         \
    }                                                                                           \
    return 0;                                                                                   \
  }                                                                                             \
                                                                                                \
  static void *gather_worker_##SFX(void *p) {                                                   \
    const above_##SFX *A = (const above_##SFX *)p;                                              \
    const int64_t F = A->F;                                                                     \
    for (int64_t r = A->r_lo; r < A->r_hi; r++) {                                               \
      const int64_t layer = r / A->batch;                                                       \
      const T *x = A->pre + r * F, *c = A->cut + layer * F;                                     \
      int64_t o = A->offset[r];                                                                 \
      for (int64_t f0 = 0; f0 < F; f0 += 32) { /* mostly nothing kept: 32 bits at a time */   \
        const int64_t nf = f0 + 32 < F ? 32 : F - f0;                                           \
        uint32_t bits = above_bits_##SFX(x + f0, c + f0, nf);                                   \
        while (bits) {                                                                          \
          const int64_t f = f0 + __builtin_ctz(bits);                                           \
          bits &= bits - 1;                                                                     \
          A->flat[o] = r * F + f;                                                               \
          A->tok[o] = r - layer * A->batch;                                                     \
          A->feat[o] = f;                                                                       \
          A->lf[o] = layer * F + f;                                                             \
          A->vals[o] = x[f];                                                                    \
          o++;                                                                                  \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
    return 0;                                                                                   \
  }                                                                                             \
                                                                                                \
  static int run_rows_##SFX(void *(*worker)(void *), above_##SFX base, int64_t rows,            \
                            int n_threads) {                                                    \
    above_##SFX A[MAX_THREADS];                                                                 \
    if (n_threads < 1 || n_threads > MAX_THREADS) return -1;                                    \
    for (int k = 0; k < n_threads; k++) {                                                       \
      A[k] = base;                                                                              \
      A[k].r_lo = rows * k / n_threads;                                                         \
      A[k].r_hi = rows * (k + 1) / n_threads;                                                   \
    }                                                                                           \
    return run_workers(worker, A, sizeof(A[0]), n_threads);                                     \
  }                                                                                             \
                                                                                                \
  /* counts [L * B]: kept positions per row of pre [L * B, F] against cut [L, F] */            \
  int clt_count_above_##SFX(int64_t n_layers, int64_t batch, int64_t F, const T *pre,           \
                            const T *cut, int64_t *counts, int n_threads) {                     \
    above_##SFX a = {0, 0, batch, F, pre, cut, counts, 0, 0, 0, 0, 0, 0};                       \
    return run_rows_##SFX(count_worker_##SFX, a, n_layers * batch, n_threads);                  \
  }                                                                                             \
                                                                                                \
  /* offset [L * B]: where each row's kept positions start in the outputs [nnz] */             \
  int clt_gather_above_##SFX(int64_t n_layers, int64_t batch, int64_t F, const T *pre,          \
                             const T *cut, const int64_t *offset, int64_t *flat, int64_t *tok,  \
                             int64_t *feat, int64_t *lf, T *vals, int n_threads) {              \
    above_##SFX a = {0, 0, batch, F, pre, cut, 0, offset, flat, tok, feat, lf, vals};           \
    return run_rows_##SFX(gather_worker_##SFX, a, n_layers * batch, n_threads);                 \
  }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
DEFINE_ENCODER_KERNEL(float, f32)
DEFINE_ENCODER_KERNEL(double, f64)
DEFINE_SUPPORT_KERNELS(float, f32)
DEFINE_SUPPORT_KERNELS(double, f64)

