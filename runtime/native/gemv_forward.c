/* Answers the cblas_sgemm calls of decode steps itself, and hands every other call to OpenBLAS.
 *
 * MLX's CPU backend computes every float32 matrix product with cblas_sgemm, decode steps included,
 * where the activations are one row (one sequence) or a few (a small batch). OpenBLAS releases
 * before 0.3.27 pack the whole weight matrix for such a call, which costs several times the
 * product itself. Preloaded in front of OpenBLAS, this library forwards single-row and
 * single-column products to sgemv, and computes products of a few rows against a linear layer's
 * weights (B transposed) reading each weight row once, while it is in the L1 cache.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { FEW_ROWS = 8 }; /* a batch of decode steps; larger products are OpenBLAS's */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn next_sgemm(void) {
    static sgemm_fn next;
    if (!next) next = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    return next;
}

static sgemv_fn blas_sgemv(void) {
    static sgemv_fn gemv;
    if (!gemv) gemv = (sgemv_fn)dlsym(RTLD_DEFAULT, "cblas_sgemv");
    return gemv;
}

/* With beta = 0 the output holds whatever the allocator left there: clear it, since a NaN left
 * in it would survive OpenBLAS's scaling by zero. */
static void clear(float *y, int n, int stride) {
    for (int i = 0; i < n; ++i) y[(size_t)i * stride] = 0.0f;
}

/* C (1 x N) = alpha * A (1 x K) * op(B) (K x N) + beta * C, row-major. */
static void single_row(int trans_a, int trans_b, int n, int k, float alpha, const float *a, int lda,
                       const float *b, int ldb, float beta, float *c) {
    if (beta == 0.0f) clear(c, n, 1);
    int x_stride = trans_a == NO_TRANS ? 1 : lda;
    if (trans_b == NO_TRANS) /* B is K x N: y = B^T x */
        blas_sgemv()(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, x_stride, beta, c, 1);
    else /* B is N x K: y = B x */
        blas_sgemv()(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, x_stride, beta, c, 1);
}

/* C (M x 1) = alpha * op(A) (M x K) * B (K x 1) + beta * C, row-major. */
static void single_column(int trans_a, int trans_b, int m, int k, float alpha, const float *a, int lda,
                          const float *b, int ldb, float beta, float *c, int ldc) {
    if (beta == 0.0f) clear(c, m, ldc);
    int x_stride = trans_b == NO_TRANS ? ldb : 1;
    if (trans_a == NO_TRANS) /* A is M x K */
        blas_sgemv()(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, x_stride, beta, c, ldc);
    else /* A is K x M */
        blas_sgemv()(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, x_stride, beta, c, ldc);
}

typedef float lanes __attribute__((vector_size(32)));

static lanes load(const float *p) {
    lanes v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Row j of C (M x N) = alpha * A (M x K) * B^T + beta * C, B stored N x K as a linear layer's weights
 * are: each weight is loaded once and used for all M rows, with one accumulator per row. */
static void few_rows_column(int j, int m, int k, float alpha, const float *a, int lda, const float *b,
                            int ldb, float beta, float *c, int ldc) {
    const float *weights = b + (size_t)j * ldb;
    lanes sums[FEW_ROWS] = {{0}};
    int p = 0;
    for (; p + 8 <= k; p += 8) {
        lanes w = load(weights + p);
        for (int i = 0; i < m; ++i) sums[i] += load(a + (size_t)i * lda + p) * w;
    }
    for (int i = 0; i < m; ++i) {
        float sum = 0.0f;
        for (int lane = 0; lane < 8; ++lane) sum += sums[i][lane];
        for (int q = p; q < k; ++q) sum += a[(size_t)i * lda + q] * weights[q];
        float *out = c + (size_t)i * ldc + j;
        *out = alpha * sum + (beta == 0.0f ? 0.0f : beta * *out);
    }
}

static void few_rows(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
                     float beta, float *c, int ldc) {
    for (int j = 0; j < n; ++j) few_rows_column(j, m, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    int plain = order == ROW_MAJOR && k > 0 && blas_sgemv() != NULL;
    if (plain && m == 1 && n > 1)
        single_row(trans_a, trans_b, n, k, alpha, a, lda, b, ldb, beta, c);
    else if (plain && n == 1 && m > 1)
        single_column(trans_a, trans_b, m, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else if (plain && m <= FEW_ROWS && trans_a == NO_TRANS && trans_b == TRANS)
        few_rows(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
        next_sgemm()(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
