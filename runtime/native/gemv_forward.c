/* Forwards single-row and single-column cblas_sgemm calls to cblas_sgemv.
 *
 * MLX's CPU backend computes every float32 matrix product with cblas_sgemm, decode steps included,
 * where one operand is a single row. OpenBLAS releases before 0.3.27 pack the whole weight matrix
 * for such a call, which costs several times the matrix-vector product itself. Preloaded in front
 * of OpenBLAS, this library answers those calls with sgemv and hands every other call on unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111 };

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
        blas_sgemv()(ROW_MAJOR, NO_TRANS + 1, k, n, alpha, b, ldb, a, x_stride, beta, c, 1);
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
        blas_sgemv()(ROW_MAJOR, NO_TRANS + 1, k, m, alpha, a, lda, b, x_stride, beta, c, ldc);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    int plain = order == ROW_MAJOR && k > 0 && blas_sgemv() != NULL;
    if (plain && m == 1 && n > 1)
        single_row(trans_a, trans_b, n, k, alpha, a, lda, b, ldb, beta, c);
    else if (plain && n == 1 && m > 1)
        single_column(trans_a, trans_b, m, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
        next_sgemm()(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
