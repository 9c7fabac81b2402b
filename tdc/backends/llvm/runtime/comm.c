/* tdc runtime: communication between the ranks of an MPI job, for generated code and native
 * executables. The same algorithms as tdc/backends/comm.py (the numba backend's, on mpi4py):
 *
 *   tdc_comm_init(timeout)               MPI (initialised here if the caller has not), a
 *                                        communicator of tdc's own and its thread
 *   tdc_comm_allreduce_start_f32(x, h, n, op, algo, slot)
 *                                        h = x, then h is reduced in place over the ranks on the
 *                                        communication thread; slot names the job
 *   tdc_comm_wait(slot)                  block until that job is done
 *   tdc_comm_allreduce_f32(x, out, n, op, algo)   both at once
 *   tdc_comm_allgather(x, out, outer, inner, sizes, p)  out = every rank's x, laid side by side
 *   tdc_comm_send(x, bytes, dst, tag)    a copy of x goes to dst; returns at once (the send is
 *                                        completed later, by the thread): sends never block, so
 *                                        programs that post messages in one order never deadlock
 *   tdc_comm_recv(out, bytes, src, tag)  blocks until the message from src with that tag is in
 *
 * Jobs run one after another on one thread, in the order they were started, which is the same
 * on every rank (they run the same step), so collectives never interleave. Every algorithm is
 * written on non-blocking point-to-point messages polled against a deadline: when a rank stops
 * answering, the waiting rank asks all ranks to answer a roll call, prints one line naming the
 * ones that did not, and ends the job (MPI_Abort). op: 0 sum, 1 mean, 2 max, 3 min.
 * algo: 0 the library's MPI_Iallreduce, 1 ring, 2 recursive doubling, 3 binomial tree.
 * A world of one rank (no mpiexec) copies. Bytes sent and seconds waited are counted.
 *
 * Build (tdc/backends/llvm/runtime.py): gcc -O3 -fPIC -I<mpich include> -c comm.c, linked with
 * -lmpi and -lpthread. */
#define _POSIX_C_SOURCE 200809L
#include <mpi.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tdc_comm.h"

#define DATA_TAG 11
#define ROLL_TAG 12
#define ROLL_GRACE 2.0
#define P2P_TAG 1000     /* send/recv of a partitioned step: P2P_TAG + the op's tag (mod 30000) */
#define MAX_SLOTS 4096

enum { OP_SUM, OP_MEAN, OP_MAX, OP_MIN };
enum { ALGO_MPI, ALGO_RING, ALGO_DOUBLING, ALGO_TREE };
enum { JOB_ALLREDUCE, JOB_BCAST, JOB_REDUCE, JOB_SEND, JOB_RECV, JOB_ALLGATHER };

typedef struct job {
    int kind, op, algo, f64;
    void *buf;
    int64_t n;
    int peer, tag;
    int detached;          /* a send: nobody waits; the thread frees it once MPI has taken the data */
    void *out;             /* allgather: the result */
    int64_t outer, inner;  /* allgather: rows before the axis, bytes per unit of the axis */
    const int64_t *sizes;  /* allgather: each rank's extent along the axis */
    MPI_Request req;       /* a detached send in flight */
    int done;              /* guarded by state.mu */
    struct job *next;
} job;

static struct {
    int ready, rank, size, stopping;
    pthread_t thread;
    MPI_Comm comm;
    double timeout;
    double yield_s;        /* how long a wait yields before it sleeps (see complete) */
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    job *head, *tail;
    job *sending;          /* detached sends in flight (the thread's own list) */
    job slots[MAX_SLOTS];
    int64_t bytes_sent;
    double wait_s;
    char token;
} state = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *xalloc(int64_t bytes)
{
    void *p = malloc(bytes > 0 ? (size_t)bytes : 1);
    if (!p) {
        fprintf(stderr, "tdc: error: rank %d: out of memory (%lld bytes for a message)\n", state.rank,
                (long long)bytes);
        MPI_Abort(MPI_COMM_WORLD, 3);
    }
    return p;
}

/* ---- waiting with a deadline, and the roll call ---------------------------------------------- */

static void answer_roll_calls(void)
{
    int flag = 1;
    while (flag) {
        MPI_Status st;
        MPI_Iprobe(MPI_ANY_SOURCE, ROLL_TAG, state.comm, &flag, &st);
        if (flag)
            MPI_Recv(&state.token, 1, MPI_CHAR, st.MPI_SOURCE, ROLL_TAG, state.comm, MPI_STATUS_IGNORE);
    }
}

static void pause_briefly(void)
{
    struct timespec t = {0, 100000};   /* 0.1 ms: leave the core to the ranks that compute */
    nanosleep(&t, NULL);
}

/* The ranks that do not take a synchronous message within ROLL_GRACE seconds, as "1, 3". */
static void roll_call(char *out, size_t cap)
{
    int p = state.size, k = 0;
    MPI_Request *reqs = xalloc((int64_t)p * (int64_t)sizeof(MPI_Request));
    for (int q = 0; q < p; q++)
        if (q != state.rank)
            MPI_Issend(&state.token, 1, MPI_CHAR, q, ROLL_TAG, state.comm, &reqs[k++]);
    double end = now() + ROLL_GRACE;
    int all = 0;
    while (!all && now() < end) {
        MPI_Testall(k, reqs, &all, MPI_STATUSES_IGNORE);
        answer_roll_calls();
        pause_briefly();
    }
    out[0] = 0;
    k = 0;
    for (int q = 0; q < p; q++) {
        if (q == state.rank)
            continue;
        int flag = 0;
        if (reqs[k] != MPI_REQUEST_NULL)
            MPI_Test(&reqs[k], &flag, MPI_STATUS_IGNORE);
        else
            flag = 1;
        if (!flag) {
            size_t len = strlen(out);
            snprintf(out + len, cap - len, "%s%d", len ? ", " : "", q);
        }
        k++;
    }
    free(reqs);
}

/* Wait for `n` requests (messages with rank `peer`, or -1: any) until the deadline. */
static void complete(int n, MPI_Request *reqs, int peer, const char *what)
{
    double start = now(), deadline = start + state.timeout;
    int flag = 0;
    for (long spins = 0;; spins++) {
        MPI_Testall(n, reqs, &flag, MPI_STATUSES_IGNORE);
        if (flag)
            return;
        if (spins > 20000) {
            /* A large message moves only while its ranks poll (MPICH's rendezvous copies it in
               pieces), so while every rank here has a core of its own a wait polls on, yielding,
               for its first 50 ms. When ranks outnumber cores a yielding rank still takes its
               share of the core from the rank it waits for: there, and in a long wait (a peer
               compiling or evaluating), it sleeps between polls. */
            if (now() - start < state.yield_s)
                sched_yield();
            else
                pause_briefly();
            answer_roll_calls();
        }
        if (now() > deadline)
            break;
    }
    char silent[256];
    roll_call(silent, sizeof silent);
    if (!silent[0]) {
        if (peer >= 0)
            snprintf(silent, sizeof silent, "%d", peer);
        else
            snprintf(silent, sizeof silent, "another rank");
    }
    fprintf(stderr, "tdc: error: rank %d: no answer from rank %s within %g s (%s); stopping the job\n", state.rank,
            silent, state.timeout, what);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
}

static void isend(const void *buf, int64_t bytes, int dst, MPI_Request *r)
{
    state.bytes_sent += bytes;
    MPI_Isend_c(buf, (MPI_Count)bytes, MPI_BYTE, dst, DATA_TAG, state.comm, r);
}

static void irecv(void *buf, int64_t bytes, int src, MPI_Request *r)
{
    MPI_Irecv_c(buf, (MPI_Count)bytes, MPI_BYTE, src, DATA_TAG, state.comm, r);
}

/* exchange: receive `rb` bytes from src into rbuf while sending `sb` bytes of sbuf to dst */
static void exchange(void *rbuf, int64_t rb, int src, const void *sbuf, int64_t sb, int dst, const char *what)
{
    MPI_Request r[2];
    irecv(rbuf, rb, src, &r[0]);
    isend(sbuf, sb, dst, &r[1]);
    complete(2, r, src, what);
}

static void send_to(const void *buf, int64_t bytes, int dst, const char *what)
{
    MPI_Request r;
    isend(buf, bytes, dst, &r);
    complete(1, &r, dst, what);
}

static void recv_from(void *buf, int64_t bytes, int src, const char *what)
{
    MPI_Request r;
    irecv(buf, bytes, src, &r);
    complete(1, &r, src, what);
}

/* ---- reductions: dst[i] = a[i] op b[i] (a from the lower rank, so every rank computes the same) */

#define REDUCE(T, NAME)                                                                         \
    static void NAME(T *dst, const T *a, const T *b, int64_t n, int op)                          \
    {                                                                                           \
        for (int64_t i = 0; i < n; i++) {                                                       \
            T x = a[i], y = b[i];                                                               \
            dst[i] = op == OP_MAX ? (x > y || x != x ? x : y)                                   \
                   : op == OP_MIN ? (x < y || x != x ? x : y) : x + y;                          \
        }                                                                                       \
    }
REDUCE(float, reduce_f32)
REDUCE(double, reduce_f64)

static void reduce(const job *j, void *dst, const void *a, const void *b, int64_t n)
{
    if (j->f64)
        reduce_f64(dst, a, b, n, j->op);
    else
        reduce_f32(dst, a, b, n, j->op);
}

/* ---- allreduce algorithms, in place on j->buf ------------------------------------------------ */

static void ring(job *j)
{
    const int p = state.size, r = state.rank, right = (r + 1) % p, left = (r + p - 1) % p;
    const int64_t es = j->f64 ? 8 : 4, n = j->n;
    char *buf = j->buf;
#define LO(i) (n * (((i) % p + p) % p) / p)
#define HI(i) (n * (((i) % p + p) % p + 1) / p)
    char *tmp = xalloc((n / p + 1) * es);
    for (int s = 0; s < p - 1; s++) {           /* reduce-scatter: r ends holding chunk r + 1 */
        int out = r - s, in = r - s - 1;
        int64_t lo = LO(in), cnt = HI(in) - lo;
        exchange(tmp, cnt * es, left, buf + LO(out) * es, (HI(out) - LO(out)) * es, right, "ring allreduce");
        reduce(j, buf + lo * es, buf + lo * es, tmp, cnt);
    }
    for (int s = 0; s < p - 1; s++) {           /* allgather */
        int out = r + 1 - s, in = r - s;
        exchange(buf + LO(in) * es, (HI(in) - LO(in)) * es, left, buf + LO(out) * es, (HI(out) - LO(out)) * es,
                 right, "ring allreduce");
    }
#undef LO
#undef HI
    free(tmp);
}

static void doubling(job *j)
{
    const int p = state.size, r = state.rank;
    const int64_t bytes = j->n * (j->f64 ? 8 : 4);
    int p2 = 1;
    while (p2 * 2 <= p)
        p2 *= 2;
    const int rem = p - p2;
    char *tmp = xalloc(bytes);
    int me;
    const char *what = "recursive-doubling allreduce";
    if (r < 2 * rem) {
        if (r % 2 == 0) {                       /* hand my vector to r + 1, get the result back */
            send_to(j->buf, bytes, r + 1, what);
            recv_from(j->buf, bytes, r + 1, what);
            free(tmp);
            return;
        }
        recv_from(tmp, bytes, r - 1, what);
        reduce(j, j->buf, tmp, j->buf, j->n);
        me = r / 2;
    } else {
        me = r - rem;
    }
    for (int mask = 1; mask < p2; mask <<= 1) {
        int peer = me ^ mask, q = peer < rem ? peer * 2 + 1 : peer + rem;
        exchange(tmp, bytes, q, j->buf, bytes, q, what);
        if (q < r)
            reduce(j, j->buf, tmp, j->buf, j->n);
        else
            reduce(j, j->buf, j->buf, tmp, j->n);
    }
    if (r < 2 * rem)
        send_to(j->buf, bytes, r - 1, what);
    free(tmp);
}

static void tree(job *j)
{
    const int p = state.size, r = state.rank;
    const int64_t bytes = j->n * (j->f64 ? 8 : 4);
    char *tmp = xalloc(bytes);
    const char *what = "tree allreduce";
    int mask = 1;
    for (; mask < p; mask <<= 1) {              /* binomial reduce to rank 0 */
        if (r & mask) {
            send_to(j->buf, bytes, r - mask, what);
            break;
        }
        if (r + mask < p) {
            recv_from(tmp, bytes, r + mask, what);
            reduce(j, j->buf, j->buf, tmp, j->n);
        }
    }
    for (mask = 1; mask < p; mask <<= 1)
        ;
    for (mask >>= 1; mask; mask >>= 1) {        /* broadcast: the same steps backwards */
        if (r % (2 * mask) == 0 && r + mask < p)
            send_to(j->buf, bytes, r + mask, what);
        else if (r % (2 * mask) == mask)
            recv_from(j->buf, bytes, r - mask, what);
    }
    free(tmp);
}

static MPI_Op mpi_op(int op)
{
    return op == OP_MAX ? MPI_MAX : op == OP_MIN ? MPI_MIN : MPI_SUM;
}

static void library(job *j)
{
    MPI_Request rq;
    const int64_t bytes = j->n * (j->f64 ? 8 : 4);
    state.bytes_sent += bytes * 2 * (state.size - 1) / state.size;   /* what a bandwidth-optimal one sends */
    MPI_Iallreduce_c(MPI_IN_PLACE, j->buf, (MPI_Count)j->n, j->f64 ? MPI_DOUBLE : MPI_FLOAT, mpi_op(j->op),
                     state.comm, &rq);
    complete(1, &rq, -1, "MPI_Allreduce");
}

/* Around the ring, p - 1 steps: at step s rank r passes on the piece of rank r - s. Pieces are
 * gathered whole into one buffer, then laid side by side along the axis into j->out. */
static void ring_allgather(job *j)
{
    const int p = state.size, r = state.rank, right = (r + 1) % p, left = (r + p - 1) % p;
    int64_t *off = xalloc((int64_t)(p + 1) * 8);
    off[0] = 0;
    for (int q = 0; q < p; q++)
        off[q + 1] = off[q] + j->outer * j->sizes[q] * j->inner;
    char *all = xalloc(off[p]);
    memcpy(all + off[r], j->buf, (size_t)(off[r + 1] - off[r]));
    for (int s = 0; s < p - 1; s++) {
        int out = ((r - s) % p + p) % p, in = ((r - s - 1) % p + p) % p;
        exchange(all + off[in], off[in + 1] - off[in], left, all + off[out], off[out + 1] - off[out], right,
                 "ring allgather");
    }
    int64_t row = 0;
    for (int q = 0; q < p; q++)
        row += j->sizes[q] * j->inner;
    for (int64_t o = 0; o < j->outer; o++) {
        int64_t at = 0;
        for (int q = 0; q < p; q++) {
            int64_t w = j->sizes[q] * j->inner;
            memcpy((char *)j->out + o * row + at, all + off[q] + o * w, (size_t)w);
            at += w;
        }
    }
    free(all);
    free(off);
}

static void run(job *j)
{
    const int64_t bytes = j->n * (j->f64 ? 8 : 4);
    MPI_Request rq;
    switch (j->kind) {
    case JOB_ALLREDUCE:
        if (j->algo == ALGO_RING)
            ring(j);
        else if (j->algo == ALGO_DOUBLING)
            doubling(j);
        else if (j->algo == ALGO_TREE)
            tree(j);
        else
            library(j);
        if (j->op == OP_MEAN) {
            if (j->f64)
                for (int64_t i = 0; i < j->n; i++)
                    ((double *)j->buf)[i] /= (double)state.size;
            else
                for (int64_t i = 0; i < j->n; i++)
                    ((float *)j->buf)[i] /= (float)state.size;
        }
        break;
    case JOB_BCAST:
        MPI_Ibcast_c(j->buf, (MPI_Count)bytes, MPI_BYTE, j->peer, state.comm, &rq);
        complete(1, &rq, j->peer, "broadcast");
        break;
    case JOB_REDUCE: {
        void *src = xalloc(bytes);
        memcpy(src, j->buf, (size_t)bytes);
        MPI_Ireduce_c(src, j->buf, (MPI_Count)j->n, j->f64 ? MPI_DOUBLE : MPI_FLOAT, MPI_SUM, j->peer, state.comm,
                      &rq);
        complete(1, &rq, -1, "reduce");
        free(src);
        if (state.rank != j->peer)
            memset(j->buf, 0, (size_t)bytes);
        break;
    }
    case JOB_SEND:         /* detached: post it; reap_sends() completes it */
        state.bytes_sent += j->n;
        MPI_Isend_c(j->buf, (MPI_Count)j->n, MPI_BYTE, j->peer, P2P_TAG + j->tag % 30000, state.comm, &j->req);
        j->next = state.sending;
        state.sending = j;
        break;
    case JOB_ALLGATHER:
        ring_allgather(j);
        break;
    default:
        MPI_Irecv_c(j->buf, (MPI_Count)j->n, MPI_BYTE, j->peer, P2P_TAG + j->tag % 30000, state.comm, &rq);
        complete(1, &rq, j->peer, "recv");
    }
}

/* Free the detached sends MPI has taken; with `all`, wait (until the deadline) for every one. */
static void reap_sends(int all)
{
    job **p = &state.sending;
    while (*p) {
        job *j = *p;
        int flag = 0;
        if (all)
            complete(1, &j->req, j->peer, "sends in flight");
        else
            MPI_Test(&j->req, &flag, MPI_STATUS_IGNORE);
        if (all || flag) {
            *p = j->next;
            free(j->buf);
            free(j);
        } else {
            p = &j->next;
        }
    }
}

/* ---- the communication thread ------------------------------------------------------------------ */

static void *serve(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&state.mu);
    for (;;) {
        while (!state.head && !state.stopping) {
            struct timespec t;
            clock_gettime(CLOCK_REALTIME, &t);
            t.tv_nsec += 50000000;
            if (t.tv_nsec >= 1000000000) {
                t.tv_sec++;
                t.tv_nsec -= 1000000000;
            }
            if (pthread_cond_timedwait(&state.wake, &state.mu, &t) != 0 && !state.head && !state.stopping) {
                pthread_mutex_unlock(&state.mu);
                answer_roll_calls();
                reap_sends(0);
                pthread_mutex_lock(&state.mu);
            }
        }
        if (!state.head)
            break;
        job *j = state.head;
        state.head = j->next;
        if (!state.head)
            state.tail = NULL;
        pthread_mutex_unlock(&state.mu);
        reap_sends(0);
        int detached = j->detached;
        run(j);
        pthread_mutex_lock(&state.mu);
        if (!detached) {
            j->done = 1;
            pthread_cond_broadcast(&state.done);
        }
    }
    pthread_mutex_unlock(&state.mu);
    reap_sends(1);      /* stopping: every send must have been taken */
    return NULL;
}

int64_t tdc_comm_init(double timeout_s)
{
    if (state.ready) {
        state.timeout = timeout_s > 0 ? timeout_s : state.timeout;
        return state.size;
    }
    int inited = 0, provided = 0;
    MPI_Initialized(&inited);
    if (!inited)
        MPI_Init_thread(NULL, NULL, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_dup(MPI_COMM_WORLD, &state.comm);
    MPI_Comm_rank(state.comm, &state.rank);
    MPI_Comm_size(state.comm, &state.size);
    state.timeout = timeout_s > 0 ? timeout_s : 30.0;
    MPI_Comm local;
    int local_ranks = 1;
    MPI_Comm_split_type(state.comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local);
    MPI_Comm_size(local, &local_ranks);
    MPI_Comm_free(&local);
    state.yield_s = local_ranks <= sysconf(_SC_NPROCESSORS_ONLN) ? 0.05 : 0.0;
    if (state.size > 1 && pthread_create(&state.thread, NULL, serve, NULL) != 0) {
        fprintf(stderr, "tdc: error: rank %d: cannot start the communication thread\n", state.rank);
        MPI_Abort(MPI_COMM_WORLD, 3);
    }
    state.ready = 1;
    return state.size;
}

int64_t tdc_comm_rank(void) { return state.rank; }
int64_t tdc_comm_size(void) { return state.size; }

void tdc_comm_stats(int64_t *bytes_sent, double *wait_seconds)
{
    *bytes_sent = state.bytes_sent;
    *wait_seconds = state.wait_s;
}

static void submit(job *j)
{
    if (!state.ready)
        tdc_comm_init(0);
    j->done = 0;
    j->next = NULL;
    if (state.size == 1) {      /* a world of one: every result is the input */
        if (j->kind == JOB_SEND || j->kind == JOB_RECV) {
            fprintf(stderr, "tdc: error: %s needs several processes; this one runs alone (rank 0 of 1)\n",
                    j->kind == JOB_SEND ? "send" : "recv");
            exit(1);
        }
        j->done = 1;
        return;
    }
    pthread_mutex_lock(&state.mu);
    if (state.tail)
        state.tail->next = j;
    else
        state.head = j;
    state.tail = j;
    pthread_cond_signal(&state.wake);
    pthread_mutex_unlock(&state.mu);
}

static void wait_job(job *j)
{
    double t0 = now();
    pthread_mutex_lock(&state.mu);
    while (!j->done)
        pthread_cond_wait(&state.done, &state.mu);
    pthread_mutex_unlock(&state.mu);
    state.wait_s += now() - t0;
}

static job *slot(int64_t k)
{
    if (k < 0 || k >= MAX_SLOTS) {
        fprintf(stderr, "tdc: error: allreduce slot %lld out of range (at most %d in flight)\n", (long long)k,
                MAX_SLOTS);
        exit(1);
    }
    return &state.slots[k];
}

static void start(int f64, const void *x, void *h, int64_t n, int64_t op, int64_t algo, job *j)
{
    if (h != x)
        memmove(h, x, (size_t)(n * (f64 ? 8 : 4)));
    *j = (job){.kind = JOB_ALLREDUCE, .op = (int)op, .algo = (int)algo, .f64 = f64, .buf = h, .n = n};
    submit(j);
}

void tdc_comm_allreduce_start_f32(const float *x, float *h, int64_t n, int64_t op, int64_t algo, int64_t k)
{
    start(0, x, h, n, op, algo, slot(k));
}

void tdc_comm_allreduce_start_f64(const double *x, double *h, int64_t n, int64_t op, int64_t algo, int64_t k)
{
    start(1, x, h, n, op, algo, slot(k));
}

void tdc_comm_wait(int64_t k)
{
    wait_job(slot(k));
}

void tdc_comm_allreduce_f32(const float *x, float *out, int64_t n, int64_t op, int64_t algo)
{
    job j;
    start(0, x, out, n, op, algo, &j);
    wait_job(&j);
}

void tdc_comm_allreduce_f64(const double *x, double *out, int64_t n, int64_t op, int64_t algo)
{
    job j;
    start(1, x, out, n, op, algo, &j);
    wait_job(&j);
}

static void blocking(int kind, int f64, void *buf, int64_t n, int64_t peer)
{
    job j = {.kind = kind, .f64 = f64, .buf = buf, .n = n, .peer = (int)peer};
    submit(&j);
    wait_job(&j);
}

void tdc_comm_broadcast(const void *x, void *out, int64_t bytes, int64_t root)
{
    if (out != x)
        memmove(out, x, (size_t)bytes);
    blocking(JOB_BCAST, 0, out, bytes, root);
}

void tdc_comm_reduce_to_f32(const float *x, float *out, int64_t n, int64_t root)
{
    if (out != x)
        memmove(out, x, (size_t)n * 4);
    blocking(JOB_REDUCE, 0, out, n, root);
}

void tdc_comm_reduce_to_f64(const double *x, double *out, int64_t n, int64_t root)
{
    if (out != x)
        memmove(out, x, (size_t)n * 8);
    blocking(JOB_REDUCE, 1, out, n, root);
}

void tdc_comm_send(const void *x, int64_t bytes, int64_t dst, int64_t tag)
{
    job *j = xalloc(sizeof *j);
    *j = (job){.kind = JOB_SEND, .buf = xalloc(bytes), .n = bytes, .peer = (int)dst, .tag = (int)tag, .detached = 1};
    memcpy(j->buf, x, (size_t)bytes);
    submit(j);
}

void tdc_comm_recv(void *out, int64_t bytes, int64_t src, int64_t tag)
{
    job j = {.kind = JOB_RECV, .buf = out, .n = bytes, .peer = (int)src, .tag = (int)tag};
    submit(&j);
    wait_job(&j);
}

void tdc_comm_allgather(const void *x, void *out, int64_t outer, int64_t inner, const int64_t *sizes, int64_t p)
{
    if (!state.ready)
        tdc_comm_init(0);
    if (p != state.size) {
        fprintf(stderr, "tdc: error: rank %d: an allgather over %lld ranks runs in a world of %d\n", state.rank,
                (long long)p, state.size);
        MPI_Abort(MPI_COMM_WORLD, 3);
    }
    if (state.size == 1) {
        memmove(out, x, (size_t)(outer * sizes[0] * inner));
        return;
    }
    job j = {.kind = JOB_ALLGATHER, .buf = (void *)x, .out = out, .outer = outer, .inner = inner, .sizes = sizes};
    submit(&j);
    wait_job(&j);
}

void tdc_comm_abort(const char *message)
{
    fprintf(stderr, "tdc: error: %s\n", message);
    fflush(stderr);
    if (state.ready && state.size > 1)
        MPI_Abort(MPI_COMM_WORLD, 3);
    exit(1);
}

/* Every rank must run the same program: refuse, naming the first rank that differs, when the
 * fingerprints (a hash of the generated code and the settings) are not all equal. */
void tdc_comm_agree(uint64_t fingerprint, const char *what)
{
    if (!state.ready)
        tdc_comm_init(0);
    if (state.size == 1)
        return;
    uint64_t *all = xalloc((int64_t)state.size * 8);
    MPI_Allgather(&fingerprint, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, state.comm);
    for (int q = 1; q < state.size; q++)
        if (all[q] != all[0]) {
            if (state.rank == 0) {
                fprintf(stderr, "tdc: error: the ranks disagree on %s: rank 0 has %016llx, rank %d has %016llx\n",
                        what, (unsigned long long)all[0], q, (unsigned long long)all[q]);
                fflush(stderr);
            }
            MPI_Barrier(state.comm);
            MPI_Finalize();
            exit(1);
        }
    free(all);
}

/* Finish the queued jobs and end the communication thread (before MPI is finalized: the thread
 * polls MPI while idle). */
void tdc_comm_stop(void)
{
    if (!state.ready || state.size == 1 || state.stopping)
        return;
    pthread_mutex_lock(&state.mu);
    state.stopping = 1;
    pthread_cond_signal(&state.wake);
    pthread_mutex_unlock(&state.mu);
    pthread_join(state.thread, NULL);
}

void tdc_comm_finish(void)
{
    int fin = 0;
    tdc_comm_stop();
    MPI_Finalized(&fin);
    if (state.ready && !fin) {
        MPI_Barrier(state.comm);
        MPI_Finalize();
    }
}
