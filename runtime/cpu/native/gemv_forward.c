/* Answers the cblas_sgemm calls of linear layers itself, and hands every other call to OpenBLAS.
 *
 * MLX's CPU backend computes every float32 matrix product with cblas_sgemm, decode steps included,
 * where the activations are one row (one sequence) or a few (a small batch). OpenBLAS releases
 * before 0.3.27 pack the whole weight matrix for such a call, which costs several times the
 * product itself. Preloaded in front of OpenBLAS, this library computes the products of activations
 * against a linear layer's weights (B transposed) itself: those of decode steps (up to 8 rows),
 * streaming each weight from memory once for all rows, and those of prompts, in the widest vectors
 * the processor has (over OpenBLAS's thread count, with helper threads of its own). It also computes
 * the few-row products of attention's weights and values, and forwards other single-row and
 * single-column products to sgemv.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
/* A batch of decode steps is up to FEW_ROWS rows, and one kernel pass. More rows against a linear layer's
 * weights (PROMPT_DEPTH or more long) are a prompt, in passes of BLOCK_ROWS rows over each chunk of weights
 * while it is in cache; OpenBLAS 0.3.21's AVX2 kernels reached 125 GFLOPS on one Zen 5 core at 512 rows,
 * these passes 150-173. Shallower products of up to MOST_ROWS rows (attention's, at a short prompt) take
 * passes of FEW_ROWS rows; more go to OpenBLAS. */
enum { FEW_ROWS = 8, MOST_ROWS = 24, PROMPT_DEPTH = 256 };

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

/* Eight lanes: on the processors measured, 512-bit vectors made these kernels slower, not faster. */
typedef float lanes __attribute__((vector_size(32)));
enum { LANES = sizeof(lanes) / sizeof(float) };

static lanes load(const float *p) {
    lanes v;
    memcpy(&v, p, sizeof v);
    return v;
}

static float lane_sum(lanes v) {
    float sum = 0.0f;
    for (int lane = 0; lane < LANES; ++lane) sum += v[lane];
    return sum;
}

/* The last k % (U * LANES) products of a row; out of line, so that the kernels below keep their
 * accumulators in registers. */
__attribute__((noinline)) static float dot(const float *x, const float *y, int n) {
    float sum = 0.0f;
    for (int q = 0; q < n; ++q) sum += x[q] * y[q];
    return sum;
}

static void store(float *out, float sum, float alpha, float beta) {
    *out = alpha * sum + (beta == 0.0f ? 0.0f : beta * *out);
}

/* Asks for the weights AHEAD floats (8 KiB) further on than those in use. With several rows, the
 * multiply-adds keep the core busy enough that the hardware prefetcher alone left the stream stalling
 * on memory: 4 rows against SmolLM2's MLP down projection ran at 20 GB/s on one thread, 36 with this
 * (one row: 44). On two threads, where the cores share the memory, 8 KiB ahead beat 4 and 16 KiB.
 * Weights are rows of one contiguous matrix, so the stream runs on into the next row; a prefetch past
 * the end does no harm. */
enum { AHEAD = 2048, FLOATS_PER_LINE = 16 };
static inline __attribute__((always_inline)) void fetch_ahead(const float *p, int count) {
    for (int line = 0; line < count; line += FLOATS_PER_LINE) __builtin_prefetch(p + AHEAD + line, 0, 3);
}

/* few_rows_R: C (R x N) = alpha * A (R x K) * B^T + beta * C, B stored N x K as a linear layer's weights
 * are. Column by column, so that the weights stream through memory in order, once for all R rows;
 * U accumulators per row along K keep enough independent multiply-adds in flight. A macro, so that
 * R and U are constants and the accumulators live in registers. */
#define FEW_ROWS_KERNEL(R, U)                                                                             \
    static void few_rows_##R(int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, \
                             float beta, float *c, int ldc) {                                             \
        int blocked = k - k % ((U) * LANES);                                                              \
        for (int j = 0; j < n; ++j) {                                                                     \
            const float *weights = b + (size_t)j * ldb;                                                   \
            lanes sums[R][U];                                                                             \
            _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i)                                           \
                _Pragma("GCC unroll 4") for (int u = 0; u < U; ++u) sums[i][u] = (lanes){0};              \
            for (int p = 0; p < blocked; p += (U) * LANES) {                                              \
                fetch_ahead(weights + p, (U) * LANES);                                                    \
                _Pragma("GCC unroll 4") for (int u = 0; u < U; ++u) {                                     \
                    lanes w = load(weights + p + u * LANES);                                              \
                    _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i)                                   \
                        sums[i][u] += load(a + (size_t)i * lda + p + u * LANES) * w;                      \
                }                                                                                         \
            }                                                                                             \
            _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i) {                                         \
                lanes total = sums[i][0];                                                                 \
                _Pragma("GCC unroll 4") for (int u = 1; u < U; ++u) total += sums[i][u];                  \
                float sum = lane_sum(total);                                                              \
                if (blocked < k) sum += dot(a + (size_t)i * lda + blocked, weights + blocked, k - blocked); \
                store(c + (size_t)i * ldc + j, sum, alpha, beta);                                         \
            }                                                                                             \
        }                                                                                                 \
    }

/* R x U accumulators, an activation and a weight vector fit in 16 vector registers up to 4 rows;
 * more rows take fewer accumulators each. */
FEW_ROWS_KERNEL(1, 4)
FEW_ROWS_KERNEL(2, 4)
FEW_ROWS_KERNEL(3, 4)
FEW_ROWS_KERNEL(4, 3)
FEW_ROWS_KERNEL(5, 2)
FEW_ROWS_KERNEL(6, 2)
FEW_ROWS_KERNEL(7, 2)
FEW_ROWS_KERNEL(8, 1)

typedef void (*few_rows_fn)(int, int, float, const float *, int, const float *, int, float, float *, int);
static const few_rows_fn FEW_ROWS_BY_COUNT[FEW_ROWS + 1] = {
    NULL, few_rows_1, few_rows_2, few_rows_3, few_rows_4, few_rows_5, few_rows_6, few_rows_7, few_rows_8,
};

/* Prompts: C (R x N) as above, for R rows of a prompt (a pass of a longer one), two weight columns at a
 * time in the widest vectors the processor has. Unlike a decode step's, a prompt's products are bound by
 * arithmetic rather than memory, so the point is how many multiply-adds each load feeds: here 2 per
 * activation loaded and R per weight (16 to 10 loads for 8 rows, against 8 to 9 in few_rows_8). */
#if defined(__AVX512F__)
typedef float wide __attribute__((vector_size(64)));
#define BLOCK_ROWS 8 /* 16 accumulators, 8 activations and 2 weights: 26 of 32 registers */
enum { PROMPT_MOST_ROWS = INT_MAX };
#else
typedef float wide __attribute__((vector_size(32)));
#define BLOCK_ROWS 6 /* 12 accumulators, 2 weights and an activation: 15 of 16 registers */
enum { PROMPT_MOST_ROWS = MOST_ROWS }; /* beyond, OpenBLAS's own AVX2 kernels (not measured on such a machine) */
#endif
/* A prompt's pass asks for the weights PROMPT_AHEAD rows ahead; a product deeper than WHOLE_DEPTH goes in
 * slices of at most SLICE, short enough that a pass's rows stay in the L1 cache (8 rows of SmolLM2's MLP
 * down projection, 1,536 long, filled it: 107 GFLOPS whole, 129 in slices of 512). */
enum { WIDE = sizeof(wide) / sizeof(float), ALIGNMENT = 64, PROMPT_AHEAD = 4, WHOLE_DEPTH = 768, SLICE = 512 };

static wide load_wide(const float *p) {
    wide v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Halves added in turn, in registers: through memory, a pass's sums took a quarter of its time (105 against
 * 141 GFLOPS at 24 rows). */
typedef float eight __attribute__((vector_size(32)));
typedef float four __attribute__((vector_size(16)));
static float wide_sum(wide v) {
#if BLOCK_ROWS > 6
    eight half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    eight half = v;
#endif
    four quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
    return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

#define BLOCK_KERNEL(R)                                                                                   \
    static void block_##R(int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,    \
                          float beta, float *c, int ldc) {                                                \
        int blocked = k - k % WIDE, j = 0;                                                                \
        for (; j + 2 <= n; j += 2) {                                                                      \
            const float *first = b + (size_t)j * ldb, *second = first + ldb;                              \
            wide left[R], right[R];                                                                       \
            _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i) left[i] = right[i] = (wide){0};           \
            for (int p = 0; p < blocked; p += WIDE) {                                                     \
                __builtin_prefetch(first + PROMPT_AHEAD * (size_t)ldb + p, 0, 3);                         \
                __builtin_prefetch(second + PROMPT_AHEAD * (size_t)ldb + p, 0, 3);                        \
                wide w0 = load_wide(first + p), w1 = load_wide(second + p);                               \
                _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i) {                                     \
                    wide x = load_wide(a + (size_t)i * lda + p);                                          \
                    left[i] += x * w0;                                                                    \
                    right[i] += x * w1;                                                                   \
                }                                                                                         \
            }                                                                                             \
            _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i) {                                         \
                const float *row = a + (size_t)i * lda + blocked;                                         \
                float sum0 = wide_sum(left[i]), sum1 = wide_sum(right[i]);                                \
                if (blocked < k) {                                                                        \
                    sum0 += dot(row, first + blocked, k - blocked);                                       \
                    sum1 += dot(row, second + blocked, k - blocked);                                      \
                }                                                                                         \
                store(c + (size_t)i * ldc + j, sum0, alpha, beta);                                        \
                store(c + (size_t)i * ldc + j + 1, sum1, alpha, beta);                                    \
            }                                                                                             \
        }                                                                                                 \
        if (j < n) /* an odd last column: the decode kernel for as many rows (R is at most FEW_ROWS) */     \
            FEW_ROWS_BY_COUNT[R](1, k, alpha, a, lda, b + (size_t)j * ldb, ldb, beta, c + j, ldc);         \
    }

BLOCK_KERNEL(1)
BLOCK_KERNEL(2)
BLOCK_KERNEL(3)
BLOCK_KERNEL(4)
BLOCK_KERNEL(5)
BLOCK_KERNEL(6)
#if BLOCK_ROWS > 6
BLOCK_KERNEL(7)
BLOCK_KERNEL(8)
#endif

/* C (M x N) = alpha * A (M x K) * B (K x N) + beta * C, B not transposed and narrow: attention's weights
 * times values (a group's query heads as rows, the cached values as B, one row per position). OpenBLAS
 * packs both operands for each such call, which costs it several times the arithmetic (at 6,000
 * positions, 0.43 ms a call where this takes a tenth). Up to PLAIN_ROWS rows at a time, PLAIN_BLOCK
 * columns at a time: each row of B is loaded once for all of them, and the sums stay in registers. */
enum { PLAIN_ROWS = 4, PLAIN_VECTORS = 4, PLAIN_BLOCK = PLAIN_VECTORS * LANES, PLAIN_MOST_COLUMNS = 256 };

/* `rows` is a constant at each call below, so that the compiler keeps the sums in registers. */
static inline __attribute__((always_inline)) void plain_block(int rows, int k, const float *a, int lda,
                                                              const float *b, int ldb,
                                                              lanes sums[PLAIN_ROWS][PLAIN_VECTORS]) {
    for (int i = 0; i < rows; ++i)
        for (int u = 0; u < PLAIN_VECTORS; ++u) sums[i][u] = (lanes){0};
    for (int p = 0; p < k; ++p) {
        lanes w[PLAIN_VECTORS];
        _Pragma("GCC unroll 4") for (int u = 0; u < PLAIN_VECTORS; ++u) w[u] = load(b + (size_t)p * ldb + u * LANES);
        _Pragma("GCC unroll 4") for (int i = 0; i < rows; ++i) {
            lanes scale = (lanes){0} + a[(size_t)i * lda + p];
            _Pragma("GCC unroll 4") for (int u = 0; u < PLAIN_VECTORS; ++u) sums[i][u] += scale * w[u];
        }
    }
}

static void plain_rows(int rows, int k, const float *a, int lda, const float *b, int ldb,
                       lanes sums[PLAIN_ROWS][PLAIN_VECTORS]) {
    switch (rows) {
    case 1: plain_block(1, k, a, lda, b, ldb, sums); break;
    case 2: plain_block(2, k, a, lda, b, ldb, sums); break;
    case 3: plain_block(3, k, a, lda, b, ldb, sums); break;
    default: plain_block(PLAIN_ROWS, k, a, lda, b, ldb, sums);
    }
}

static float plain_column(int k, const float *a, const float *b, int ldb) {
    float sum = 0.0f;
    for (int p = 0; p < k; ++p) sum += a[p] * b[(size_t)p * ldb];
    return sum;
}

static void few_rows_plain(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
                           float beta, float *c, int ldc) {
    int blocked = n - n % PLAIN_BLOCK;
    for (int first = 0; first < m; first += PLAIN_ROWS) {
        int rows = m - first < PLAIN_ROWS ? m - first : PLAIN_ROWS;
        const float *row = a + (size_t)first * lda;
        float *out = c + (size_t)first * ldc;
        for (int j = 0; j < blocked; j += PLAIN_BLOCK) {
            lanes sums[PLAIN_ROWS][PLAIN_VECTORS];
            plain_rows(rows, k, row, lda, b + j, ldb, sums);
            for (int i = 0; i < rows; ++i)
                for (int q = 0; q < PLAIN_BLOCK; ++q)
                    store(out + (size_t)i * ldc + j + q, sums[i][q / LANES][q % LANES], alpha, beta);
        }
        for (int i = 0; i < rows; ++i)
            for (int j = blocked; j < n; ++j)
                store(out + (size_t)i * ldc + j, plain_column(k, row + (size_t)i * lda, b + j, ldb), alpha, beta);
    }
}

static const few_rows_fn BLOCK_BY_COUNT[BLOCK_ROWS + 1] = {
    NULL, block_1, block_2, block_3, block_4, block_5, block_6,
#if BLOCK_ROWS > 6
    block_7, block_8,
#endif
};

static int blas_threads(void) {
    static int (*get)(void);
    if (!get) get = (int (*)(void))dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
    return get ? get() : 1;
}

/* Several BLAS threads: the weights' columns are cut into chunks that the caller and
 * helper threads claim one at a time, so a helper that the system has not scheduled yet costs
 * nothing but its help. Helpers wait a little after a product (the next one of a decode step comes
 * within microseconds), then sleep. While waiting they yield the processor, for on a machine with
 * few cores the thread that builds the next step's graph needs it (4-client serving: 101-114 ->
 * 110-126 tok/s on 2 cores). Whether this beats one thread on a busy machine is the runtime's
 * to measure: it is used only when OpenBLAS is set to more than one thread. */
enum { MOST_HELPERS = 15, CHUNK_WEIGHTS = 32768, SPIN_NANOSECONDS = 100000 };

typedef struct {
    int m, n, k, lda, ldb, ldc, chunk, chunks;
    float alpha, beta;
    const float *a, *b;
    float *c;
} product;

static product work;                        /* written before its generation is published */
static _Atomic unsigned long long claims;   /* generation << 32 | the next unclaimed chunk */
static _Atomic unsigned long long limits;   /* generation << 32 | how many chunks that product has */
static atomic_int finished, sleeping;
static int helpers;                         /* started in this process (none after a fork) */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER, sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static unsigned generation_of(unsigned long long word) { return (unsigned)(word >> 32); }

/* The next chunk of `generation`'s product, or -1 when none is left (or another product began). The
 * chunk count comes from `limits`, never from a helper's copy of `work`: a helper that arrives after the
 * last chunk was claimed may copy `work` while the caller writes the next product into it, and a count
 * read from that copy could let it claim past the end of the finished product (and write through the
 * new one's half-copied pointers: a heap corruption seen once in a benchmark's server). */
static int claim(unsigned generation) {
    unsigned long long limit = atomic_load(&limits);
    if (generation_of(limit) != generation) return -1;
    unsigned chunks = (unsigned)(limit & 0xffffffffu);
    unsigned long long word = atomic_load(&claims);
    while (generation_of(word) == generation && (unsigned)(word & 0xffffffffu) < chunks)
        if (atomic_compare_exchange_weak(&claims, &word, word + 1)) return (int)(word & 0xffffffffu);
    return -1;
}

static int is_prompt(int m, int k) { return m > FEW_ROWS && k >= PROMPT_DEPTH; }

/* One chunk of the weights' columns against every row of A, a pass of rows at a time: the chunk is read
 * from memory once, then from cache. */
static void run_chunk(const product *task, int chunk) {
    int first = chunk * task->chunk, count = task->n - first < task->chunk ? task->n - first : task->chunk;
    if (!is_prompt(task->m, task->k)) {
        for (int row = 0; row < task->m; row += FEW_ROWS) {
            int rows = task->m - row < FEW_ROWS ? task->m - row : FEW_ROWS;
            FEW_ROWS_BY_COUNT[rows](count, task->k, task->alpha, task->a + (size_t)row * task->lda, task->lda,
                                    task->b + (size_t)first * task->ldb, task->ldb, task->beta,
                                    task->c + (size_t)row * task->ldc + first, task->ldc);
        }
        return;
    }
    /* Each slice of K adds to what the ones before it left in C. */
    int slices = task->k <= WHOLE_DEPTH ? 1 : (task->k + SLICE - 1) / SLICE;
    int slice = ((task->k + slices - 1) / slices + WIDE - 1) / WIDE * WIDE;
    for (int start = 0; start < task->k; start += slice) {
        int length = task->k - start < slice ? task->k - start : slice;
        float beta = start == 0 ? task->beta : 1.0f;
        for (int row = 0; row < task->m; row += BLOCK_ROWS) {
            int rows = task->m - row < BLOCK_ROWS ? task->m - row : BLOCK_ROWS;
            BLOCK_BY_COUNT[rows](count, length, task->alpha, task->a + (size_t)row * task->lda + start, task->lda,
                                 task->b + (size_t)first * task->ldb + start, task->ldb, beta,
                                 task->c + (size_t)row * task->ldc + first, task->ldc);
        }
    }
}

static void run_alone(const product *task) {
    for (int chunk = 0; chunk < task->chunks; ++chunk) run_chunk(task, chunk);
}

static int run_chunks(const product *task, unsigned generation) {
    int count = 0;
    for (int chunk; (chunk = claim(generation)) >= 0; ++count) run_chunk(task, chunk);
    return count;
}

static long long nanoseconds(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000000000LL + now.tv_nsec;
}

static void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static unsigned next_generation(unsigned seen) {
    long long until = nanoseconds() + SPIN_NANOSECONDS;
    for (int spin = 1;; ++spin) {
        if (generation_of(atomic_load(&claims)) != seen) return generation_of(atomic_load(&claims));
        if (spin < 64) {
            relax();
            continue;
        }
        sched_yield();
        if (spin % 16 == 0 && nanoseconds() > until) break;
    }
    pthread_mutex_lock(&sleep_lock);
    atomic_fetch_add(&sleeping, 1);
    while (generation_of(atomic_load(&claims)) == seen) pthread_cond_wait(&wake, &sleep_lock);
    atomic_fetch_sub(&sleeping, 1);
    pthread_mutex_unlock(&sleep_lock);
    return generation_of(atomic_load(&claims));
}

static void *helper(void *unused) {
    (void)unused;
    for (unsigned seen = generation_of(atomic_load(&claims));;) {
        seen = next_generation(seen);
        product task = work; /* if a newer product replaced it meanwhile, claim() gives nothing */
        atomic_fetch_add(&finished, run_chunks(&task, seen));
    }
    return NULL;
}

static void forget_helpers(void) { /* a forked child has only the thread that forked */
    helpers = 0;
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake, NULL);
}

static int start_helpers(int wanted) {
    static int fork_handler;
    if (!fork_handler) fork_handler = !pthread_atfork(NULL, NULL, forget_helpers);
    for (pthread_t thread; helpers < wanted && helpers < MOST_HELPERS; ++helpers) {
        if (pthread_create(&thread, NULL, helper, NULL)) break;
        pthread_detach(thread);
    }
    return helpers;
}

static void publish(const product *task) {
    unsigned long long generation = generation_of(atomic_load(&claims)) + 1;
    work = *task;
    atomic_store(&finished, 0);
    atomic_store(&limits, generation << 32 | (unsigned)task->chunks);
    atomic_store(&claims, generation << 32);
    if (atomic_load(&sleeping)) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
}

/* A prompt's rows, copied to cache-line-aligned rows if they are not already: MLX's buffers are not
 * aligned to 64 bytes, and every wide load of an activation then straddles two cache lines (a pass of 8
 * rows ran at 87 GFLOPS instead of 141 on one thread). The copy is the calling thread's, reused. */
static const float *aligned_rows(int m, int k, const float *a, int *lda) {
    static __thread float *copy;
    static __thread size_t floats;
    if ((uintptr_t)a % ALIGNMENT == 0 && *lda % (ALIGNMENT / sizeof(float)) == 0) return a;
    int stride = (k + WIDE - 1) / WIDE * WIDE;
    size_t wanted = (size_t)m * stride;
    if (wanted > floats) {
        free(copy);
        copy = aligned_alloc(ALIGNMENT, wanted * sizeof(float));
        floats = copy ? wanted : 0;
        if (!copy) return a;
    }
    for (int i = 0; i < m; ++i) memcpy(copy + (size_t)i * stride, a + (size_t)i * *lda, (size_t)k * sizeof(float));
    *lda = stride;
    return copy;
}

static void few_rows(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                     float *c, int ldc) {
    if (is_prompt(m, k)) a = aligned_rows(m, k, a, &lda);
    int chunk = CHUNK_WEIGHTS / k / 2 * 2 > 0 ? CHUNK_WEIGHTS / k / 2 * 2 : 2; /* even: prompts take columns in pairs */
    product whole = {m, n, k, lda, ldb, ldc, chunk, (n + chunk - 1) / chunk, alpha, beta, a, b, c};
    int threads = (long)n * k >= 2 * CHUNK_WEIGHTS ? blas_threads() : 1;
    if (threads < 2 || pthread_mutex_trylock(&pool_lock)) { /* one thread, or another caller has the pool */
        run_alone(&whole);
        return;
    }
    if (start_helpers(threads - 1) == 0) {
        pthread_mutex_unlock(&pool_lock);
        run_alone(&whole);
        return;
    }
    publish(&whole);
    const product *task = &work;
    atomic_fetch_add(&finished, run_chunks(task, generation_of(atomic_load(&claims))));
    while (atomic_load(&finished) < task->chunks) relax();
    pthread_mutex_unlock(&pool_lock);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    int plain = order == ROW_MAJOR && k > 0 && blas_sgemv() != NULL;
    /* One row too: with the prefetch, faster than OpenBLAS's threaded sgemv (SmolLM2's products of a
     * decode step on two threads: 8.1-9.9 ms with sgemv, 7.0-7.8 with this kernel). */
    int rows = m >= 1 && (m <= MOST_ROWS || (k >= PROMPT_DEPTH && m <= PROMPT_MOST_ROWS));
    int linear = rows && n > 1 && trans_a == NO_TRANS && trans_b == TRANS;
    int narrow = m > 1 && m <= FEW_ROWS && n > 1 && n <= PLAIN_MOST_COLUMNS && trans_a == NO_TRANS && trans_b == NO_TRANS;
    if (plain && linear)
        few_rows(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else if (plain && narrow)
        few_rows_plain(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else if (plain && m == 1 && n > 1)
        single_row(trans_a, trans_b, n, k, alpha, a, lda, b, ldb, beta, c);
    else if (plain && n == 1 && m > 1)
        single_column(trans_a, trans_b, m, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
        next_sgemm()(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
