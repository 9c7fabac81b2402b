/* The generic program of a tdc native bundle: reads inputs (.npy) and weights, calls the compiled
   graph, prints and writes its outputs (inference) or runs training steps and saves the updated
   weights (training). Everything model-specific comes from the generated header, so the same file
   serves every model:

       gcc -O2 -std=c11 -DTDC_MODEL_HEADER='"OUT/model.h"' -c main.c
       (or: -include OUT/model.h -D_POSIX_C_SOURCE=200809L)

   Exit status: 0 success; 1 error in data, files or the run (bad .npy, wrong shape or dtype,
   missing or corrupt weights, a label out of range, out of memory, cannot write); 2 usage error
   (unknown option, missing value, unknown or missing input or output name).
   Every error is one line on stderr: "PROG: error: ...".

   The weights file format ("TDCW", little-endian) is shared with
   tdc/ir/weights.py:
       "TDCWGT01", u64 payload_bytes, u64 n_entries, u64 FNV-1a-64(payload),
       entries {u32 name_len, name, u32 dtype, u32 rank, i64 shape[rank], u64 offset, u64 nbytes},
       zero padding to a multiple of 64, payload. */

#if defined(TDC_MODEL) && !defined(_POSIX_C_SOURCE)
#error "the model header was included before main.c could select POSIX: build with -DTDC_MODEL_HEADER='\"OUT/model.h\"', or add -D_POSIX_C_SOURCE=200809L to -include OUT/model.h"
#endif
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifdef TDC_MODEL_HEADER
#include TDC_MODEL_HEADER
#endif
#ifndef TDC_MODEL
#error "no model header: build with -DTDC_MODEL_HEADER='\"OUT/model.h\"'"
#endif
#ifndef TDC_SCHEDULE      /* a header without a learning-rate schedule: the lr input as given */
#define TDC_SCHEDULE 0
#define TDC_WARMUP 0
#define TDC_STEP_SIZE 0
#define TDC_GAMMA 0.1
#endif
#ifndef TDC_COMM          /* a header that predates communication (or a hand-written test model) */
#define TDC_COMM 0
#define TDC_RANKS 1
#define TDC_FINGERPRINT 0ULL
#endif
#ifndef TDC_PROFILE       /* 1: compiled with tdc compile --profile, the program times its kernels */
#define TDC_PROFILE 0
#endif
#ifndef TDC_PARTITIONED   /* 1: every rank runs its own part of the step on the whole batch */
#define TDC_PARTITIONED 0
#endif
#if TDC_COMM
#include "tdc_comm.h"     /* data parallelism: MPI through runtime/comm.c */
#endif

enum { EXIT_ERROR = 1, EXIT_USAGE = 2 };
enum { MAX_NPY_RANK = 32, MAX_NPY_HEADER = 1 << 20, MAX_NAME = 4096, PREVIEW = 8 };

#define ALIGN 64
#define MAYBE_UNUSED __attribute__((unused)) /* used in one mode (inference or training) only */
#define WEIGHTS_MAGIC "TDCWGT01"
#define DEFAULT_WEIGHTS "model.weights"
#define DEFAULT_SAVE "trained.weights"

static const char *prog = "model";
static char *pending_tmp = NULL; /* a temp file to remove if we die while writing it */
static int rank = 0, world = 1; /* this process's place in an MPI job (TDC_COMM) */

/* ---- errors -------------------------------------------------------------------------------- */

static void die(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

static void die(int status, const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++) /* one line, whatever a file name holds */
        if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
    if (pending_tmp) unlink(pending_tmp);
    fflush(stdout);
    if (world > 1) {      /* the other ranks would wait for this one: end them all */
        fprintf(stderr, "%s: error: rank %d: %s\n", prog, rank, msg);
#if TDC_COMM
        fflush(stderr);
        tdc_comm_abort("stopping the job");
#endif
    }
    fprintf(stderr, "%s: error: %s\n", prog, msg);
    exit(status);
}

/* An error every rank finds alike (the world size, the arguments): rank 0 says it, all stop. */
MAYBE_UNUSED static void die_all(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

MAYBE_UNUSED static void die_all(int status, const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (rank == 0) fprintf(stderr, "%s: error: %s\n", prog, msg);
#if TDC_COMM
    tdc_comm_finish();
#endif
    exit(status);
}

/* ---- dtypes and tensor descriptions --------------------------------------------------------- */

/* bf16 is the top half of an f32; rounding as the generated code does it (nearest even, a NaN
   kept quiet rather than carried into inf) */
static float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (isnan(f)) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

typedef struct {
    const char *name, *descr;
    int size;
} dtype_desc;

static const dtype_desc DTYPES[] = {
    [TDC_F32] = {"f32", "<f4", 4}, [TDC_F64] = {"f64", "<f8", 8}, [TDC_I8] = {"i8", "|i1", 1},
    [TDC_I32] = {"i32", "<i4", 4}, [TDC_I64] = {"i64", "<i8", 8}, [TDC_BOOL] = {"bool", "|b1", 1},
    [TDC_U8] = {"u8", "|u1", 1},   [TDC_I16] = {"i16", "<i2", 2}, [TDC_U16] = {"u16", "<u2", 2},
    [TDC_U32] = {"u32", "<u4", 4}, [TDC_U64] = {"u64", "<u8", 8},
    /* .npy has no bfloat16: np.save of an ml_dtypes.bfloat16 array writes the descr '<V2' (two
       raw bytes), which is what is read and written here; np.load gives |V2, and
       .view(ml_dtypes.bfloat16) the values */
    [TDC_BF16] = {"bf16", "<V2", 2},
};
#define NUM_DTYPES ((int)(sizeof DTYPES / sizeof DTYPES[0]))

static int valid_dtype(int64_t code) { return code >= 0 && code < NUM_DTYPES && DTYPES[code].name; }

/* "f32[1,28,28]" into buf */
static const char *type_str(char *buf, size_t cap, int dtype, int rank, const int64_t *shape) {
    size_t n = (size_t)snprintf(buf, cap, "%s[", valid_dtype(dtype) ? DTYPES[dtype].name : "?");
    for (int i = 0; i < rank && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? "," : "", (long long)shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
    return buf;
}

static const char *info_str(char *buf, size_t cap, const tdc_tensor_info *t) {
    return type_str(buf, cap, t->dtype, t->rank, t->shape);
}

static int64_t elems_of(int rank, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < rank; i++) n *= shape[i];
    return n;
}

/* The header is generated; a mistake in it is reported here rather than as a crash later. */
static void check_info(const tdc_tensor_info *t, const char *kind, int is_weight) {
    int ok = t->name && valid_dtype(t->dtype) && t->rank >= 0 && t->rank <= 8 && t->nbytes >= 0;
    int64_t n = 1;
    for (int i = 0; ok && i < t->rank; i++) {
        if (t->shape[i] < 0 || (t->shape[i] > 0 && n > INT64_MAX / 8 / t->shape[i])) ok = 0;
        else n *= t->shape[i];
    }
    if (ok && n * DTYPES[t->dtype].size != t->nbytes) ok = 0;
    if (ok && is_weight && (t->offset < 0 || t->offset % DTYPES[t->dtype].size != 0 ||
                            t->offset > (int64_t)TDC_WEIGHTS_BYTES - t->nbytes))
        ok = 0;
    if (!ok)
        die(EXIT_ERROR, "the model header is inconsistent: %s '%s' (dtype, shape, nbytes or offset)", kind,
            t->name ? t->name : "?");
}

/* ---- memory and files ----------------------------------------------------------------------- */

static void *xalloc(size_t n, const char *what) {
    void *p = NULL;
    if (posix_memalign(&p, ALIGN, n ? (n + ALIGN - 1) / ALIGN * ALIGN : ALIGN) != 0 || !p)
        die(EXIT_ERROR, "out of memory (%zu bytes for %s)", n, what);
    memset(p, 0, n);
    return p;
}

static uint64_t rd_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static uint32_t rd_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

MAYBE_UNUSED static void wr_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

MAYBE_UNUSED static void wr_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t fnv1a64(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

/* Size of a regular file, or -1 (pipes and the like: reads are checked instead). */
static int64_t file_size(FILE *f) {
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode)) return (int64_t)st.st_size;
    return -1;
}

/* Writes head then data to `path` atomically: a temp file in the same directory, fsync, rename. */
static void write_atomic(const char *path, const void *head, size_t head_n, const void *data, size_t data_n,
                         const char *what) {
    const char *slash = strrchr(path, '/');
    size_t dir_n = slash ? (size_t)(slash - path) + 1 : 0;
    const char *base = slash ? slash + 1 : path;
    if (!*base) die(EXIT_ERROR, "cannot write %s to '%s': not a file name", what, path);
    size_t cap = dir_n + strlen(base) + 32;
    char *tmp = malloc(cap);
    if (!tmp) die(EXIT_ERROR, "out of memory");
    snprintf(tmp, cap, "%.*s.tmp-%s-XXXXXX", (int)dir_n, path, base);
    int fd = mkstemp(tmp);
    if (fd < 0) die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(errno));
    pending_tmp = tmp;
    mode_t mask = umask(0);
    umask(mask);
    if (fchmod(fd, 0666 & ~mask) != 0) { /* mkstemp makes 0600; files we write are like any other */
    }
    const unsigned char *parts[2] = {head, data};
    size_t sizes[2] = {head_n, data_n};
    for (int k = 0; k < 2; k++) {
        size_t done = 0;
        while (done < sizes[k]) {
            ssize_t w = write(fd, parts[k] + done, sizes[k] - done);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                int e = w < 0 ? errno : ENOSPC;
                close(fd);
                die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(e));
            }
            done += (size_t)w;
        }
    }
    if (fsync(fd) != 0) {
        int e = errno;
        close(fd);
        die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(e));
    }
    if (close(fd) != 0) die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(errno));
    if (rename(tmp, path) != 0) die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(errno));
    pending_tmp = NULL;
    free(tmp);
}

/* Fails early (before any run) when `path` cannot be created: its directory is missing or read-only. */
static void check_writable(const char *path, const char *what) {
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == path) snprintf(dir, sizeof dir, "/");
    else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    struct stat st;
    if (!*path || (slash && !slash[1])) die(EXIT_ERROR, "cannot write %s to '%s': not a file name", what, path);
    if (stat(dir, &st) != 0) die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(ENOTDIR));
    if (access(dir, W_OK | X_OK) != 0) die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(errno));
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        die(EXIT_ERROR, "cannot write %s to '%s': %s", what, path, strerror(EISDIR));
}

/* ---- .npy ------------------------------------------------------------------------------------- */

typedef struct {
    const char *path, *what; /* what: "input 'x'" for messages */
    FILE *f;
    int64_t file_size, data_offset;
    int dtype; /* -1: a descr tdc does not support */
    char descr[24];
    int rank;
    int64_t shape[MAX_NPY_RANK];
    int64_t nbytes; /* data bytes */
    void *data;
} npy_file;

typedef struct {
    const char *s;
    size_t n, i;
} cursor;

static void skip_ws(cursor *c) {
    while (c->i < c->n && (c->s[c->i] == ' ' || c->s[c->i] == '\t' || c->s[c->i] == '\n' || c->s[c->i] == '\r'))
        c->i++;
}

static int eat(cursor *c, char ch) {
    skip_ws(c);
    if (c->i < c->n && c->s[c->i] == ch) {
        c->i++;
        return 1;
    }
    return 0;
}

static int eat_word(cursor *c, const char *w) {
    size_t n = strlen(w);
    skip_ws(c);
    if (c->n - c->i >= n && memcmp(c->s + c->i, w, n) == 0) {
        c->i += n;
        return 1;
    }
    return 0;
}

static int parse_str(cursor *c, char *out, size_t cap) {
    skip_ws(c);
    if (c->i >= c->n || (c->s[c->i] != '\'' && c->s[c->i] != '"')) return 0;
    char q = c->s[c->i++];
    size_t len = 0;
    while (c->i < c->n && c->s[c->i] != q) {
        if (c->s[c->i] == '\\' || len + 1 >= cap) return 0;
        out[len++] = c->s[c->i++];
    }
    if (c->i >= c->n) return 0;
    c->i++;
    out[len] = 0;
    return 1;
}

static int parse_int(cursor *c, int64_t *v) {
    skip_ws(c);
    int64_t x = 0;
    size_t start = c->i;
    while (c->i < c->n && c->s[c->i] >= '0' && c->s[c->i] <= '9') {
        if (x > (INT64_MAX - 9) / 10) return 0;
        x = x * 10 + (c->s[c->i++] - '0');
    }
    if (c->i == start) return 0;
    if (c->i < c->n && c->s[c->i] == 'L') c->i++; /* Python 2 longs */
    *v = x;
    return 1;
}

static int parse_shape(cursor *c, npy_file *a) {
    if (!eat(c, '(')) return 0;
    a->rank = 0;
    if (eat(c, ')')) return 1;
    for (;;) {
        if (a->rank >= MAX_NPY_RANK || !parse_int(c, &a->shape[a->rank])) return 0;
        a->rank++;
        if (eat(c, ',')) {
            if (eat(c, ')')) return 1;
        } else
            return eat(c, ')');
    }
}

static int descr_dtype(const char *d) {
    static const char *const codes[] = {[TDC_F32] = "f4", [TDC_F64] = "f8", [TDC_I8] = "i1",
                                        [TDC_I32] = "i4", [TDC_I64] = "i8", [TDC_BOOL] = "b1",
                                        [TDC_U8] = "u1",  [TDC_I16] = "i2", [TDC_U16] = "u2",
                                        [TDC_U32] = "u4", [TDC_U64] = "u8",  [TDC_BF16] = "V2"};
    char order = d[0];
    if (order != '<' && order != '|' && order != '=' && order != '>') return -1;
    for (int i = 0; i < NUM_DTYPES; i++) {
        if (strcmp(d + 1, codes[i]) != 0) continue;
        if (order == '>' && DTYPES[i].size > 1) return -1; /* big-endian */
        return i;
    }
    return -1;
}

/* Parses the header dict; returns NULL or a description of what is wrong. */
static const char *parse_npy_header(const char *s, size_t n, npy_file *a) {
    cursor c = {s, n, 0};
    int have_descr = 0, have_order = 0, have_shape = 0, fortran = 0;
    if (!eat(&c, '{')) return "the header is not a dict";
    while (!eat(&c, '}')) {
        char key[32];
        if (!parse_str(&c, key, sizeof key) || !eat(&c, ':')) return "malformed header";
        if (strcmp(key, "descr") == 0 && !have_descr) {
            if (!parse_str(&c, a->descr, sizeof a->descr)) return "unsupported dtype (descr)";
            have_descr = 1;
        } else if (strcmp(key, "fortran_order") == 0 && !have_order) {
            if (eat_word(&c, "True")) fortran = 1;
            else if (!eat_word(&c, "False")) return "malformed fortran_order";
            have_order = 1;
        } else if (strcmp(key, "shape") == 0 && !have_shape) {
            if (!parse_shape(&c, a)) return "malformed or unsupported shape";
            have_shape = 1;
        } else
            return "unexpected key in the header";
        if (!eat(&c, ',')) {
            if (!eat(&c, '}')) return "malformed header";
            break;
        }
    }
    skip_ws(&c);
    if (c.i != c.n) return "malformed header (data after the dict)";
    if (!have_descr || !have_order || !have_shape) return "the header lacks descr, fortran_order or shape";
    a->dtype = descr_dtype(a->descr);
    int nontrivial = 0;
    for (int i = 0; i < a->rank; i++) nontrivial += a->shape[i] != 1;
    if (fortran && nontrivial > 1) return "Fortran-order arrays are not supported (save a C-order array)";
    return NULL;
}

static void npy_fail(const npy_file *a, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

static void npy_fail(const npy_file *a, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    die(EXIT_ERROR, "%s: '%s' %s", a->what, a->path, msg);
}

/* Opens a .npy file and parses its header (data is read by npy_read_data). */
static void npy_open(npy_file *a, const char *path, const char *what) {
    memset(a, 0, sizeof *a);
    a->path = path;
    a->what = what;
    a->f = fopen(path, "rb");
    if (!a->f) die(EXIT_ERROR, "%s: cannot open '%s': %s", what, path, strerror(errno));
    a->file_size = file_size(a->f);
    unsigned char pre[12];
    size_t got = fread(pre, 1, 10, a->f);
    if (got < 10 && ferror(a->f)) npy_fail(a, "cannot be read: %s", strerror(errno));
    if (got < 6 || memcmp(pre, "\x93NUMPY", 6) != 0) npy_fail(a, "is not a .npy file (bad magic)");
    if (got < 10) npy_fail(a, "is truncated (ends inside the .npy header)");
    int major = pre[6], minor = pre[7];
    uint64_t hlen;
    int64_t pre_n;
    if (major == 1) {
        hlen = (uint64_t)pre[8] | (uint64_t)pre[9] << 8;
        pre_n = 10;
    } else if (major == 2 || major == 3) {
        if (fread(pre + 10, 1, 2, a->f) != 2) npy_fail(a, "is truncated (ends inside the .npy header)");
        hlen = rd_u32(pre + 8);
        pre_n = 12;
    } else
        npy_fail(a, "has an unsupported .npy format version %d.%d", major, minor);
    if (hlen > MAX_NPY_HEADER) npy_fail(a, "is corrupt (a .npy header of %llu bytes)", (unsigned long long)hlen);
    if (a->file_size >= 0 && (int64_t)hlen > a->file_size - pre_n)
        npy_fail(a, "is truncated (ends inside the .npy header)");
    char *h = malloc(hlen + 1);
    if (!h) die(EXIT_ERROR, "out of memory");
    if (fread(h, 1, hlen, a->f) != hlen) npy_fail(a, "is truncated (ends inside the .npy header)");
    h[hlen] = 0;
    if (memchr(h, 0, hlen)) npy_fail(a, "is corrupt (a NUL byte in the .npy header)");
    const char *err = parse_npy_header(h, hlen, a);
    free(h);
    if (err) npy_fail(a, "has a bad .npy header: %s", err);
    a->data_offset = pre_n + (int64_t)hlen;
    int size = a->dtype >= 0 ? DTYPES[a->dtype].size : 1;
    int64_t n = size;
    for (int i = 0; i < a->rank; i++) {
        if (a->shape[i] > 0 && n > INT64_MAX / a->shape[i]) npy_fail(a, "is corrupt (its shape is too large)");
        n *= a->shape[i];
    }
    a->nbytes = n;
}

static void npy_read_data(npy_file *a) {
    if (a->file_size >= 0) {
        int64_t have = a->file_size - a->data_offset;
        if (have < a->nbytes)
            npy_fail(a, "is truncated (%lld data bytes, its header says %lld)", (long long)have,
                     (long long)a->nbytes);
        if (have > a->nbytes)
            npy_fail(a, "is corrupt (%lld unexpected bytes after the array data)", (long long)(have - a->nbytes));
    }
    a->data = xalloc((size_t)a->nbytes, a->what);
    size_t got = fread(a->data, 1, (size_t)a->nbytes, a->f);
    if (got != (size_t)a->nbytes)
        npy_fail(a, "is truncated (%zu data bytes, its header says %lld)", got, (long long)a->nbytes);
    if (fgetc(a->f) != EOF) npy_fail(a, "is corrupt (unexpected bytes after the array data)");
    if (ferror(a->f)) npy_fail(a, "cannot be read: %s", strerror(errno));
    fclose(a->f);
    a->f = NULL;
    if (a->dtype == TDC_BOOL) { /* the model may rely on 0/1 */
        unsigned char *p = a->data;
        for (int64_t i = 0; i < a->nbytes; i++) p[i] = p[i] != 0;
    }
}

/* A .npy (version 1.0) header for a C-order array: magic, version, length, padded dict. */
static size_t npy_header(unsigned char *buf, size_t cap, const tdc_tensor_info *t) {
    char dict[512];
    size_t n = (size_t)snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                                DTYPES[t->dtype].descr);
    for (int i = 0; i < t->rank; i++)
        n += (size_t)snprintf(dict + n, sizeof dict - n, "%lld%s", (long long)t->shape[i],
                              t->rank == 1 ? "," : (i + 1 < t->rank ? ", " : ""));
    n += (size_t)snprintf(dict + n, sizeof dict - n, "), }");
    size_t total = (10 + n + 1 + ALIGN - 1) / ALIGN * ALIGN; /* +1: the closing newline */
    if (total > cap) die(EXIT_ERROR, "internal: .npy header too long");
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (unsigned char)((total - 10) & 0xff);
    buf[9] = (unsigned char)((total - 10) >> 8);
    memcpy(buf + 10, dict, n);
    memset(buf + 10 + n, ' ', total - 10 - n - 1);
    buf[total - 1] = '\n';
    return total;
}

static void write_npy(const char *path, const tdc_tensor_info *t, const void *data, const char *what) {
    unsigned char head[1024];
    size_t n = npy_header(head, sizeof head, t);
    write_atomic(path, head, n, data, (size_t)t->nbytes, what);
}

/* ---- number literals for rank-0 inputs --------------------------------------------------------- */

/* 1: parsed into out; 0: not a number at all; -1: a number this dtype cannot hold. */
static int parse_literal(const char *s, int dtype, void *out) {
    if (dtype == TDC_BOOL) {
        int v = -1;
        if (!strcmp(s, "true") || !strcmp(s, "True") || !strcmp(s, "1")) v = 1;
        if (!strcmp(s, "false") || !strcmp(s, "False") || !strcmp(s, "0")) v = 0;
        if (v >= 0) {
            *(unsigned char *)out = (unsigned char)v;
            return 1;
        }
    }
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    if (!*s || *end || end == s) return 0;
    if (dtype == TDC_F64) {
        *(double *)out = d;
        return 1;
    }
    if (dtype == TDC_F32) {
        if (isfinite(d) && fabs(d) > FLT_MAX) return -1;
        *(float *)out = (float)d;
        return 1;
    }
    if (dtype == TDC_BF16) {
        if (isfinite(d) && fabs(d) > FLT_MAX) return -1;
        *(uint16_t *)out = f32_to_bf16((float)d);
        return 1;
    }
    if (dtype == TDC_BOOL) return -1;
    errno = 0;
    if (dtype == TDC_U8 || dtype == TDC_U16 || dtype == TDC_U32 || dtype == TDC_U64) {
        /* strtoull takes "-1" as ULLONG_MAX: a sign is refused before it can wrap */
        if (strchr(s, '-')) return -1;
        unsigned long long u = strtoull(s, &end, 10);
        if (*end || errno == ERANGE) return -1;
        if ((dtype == TDC_U8 && u > UINT8_MAX) || (dtype == TDC_U16 && u > UINT16_MAX) ||
            (dtype == TDC_U32 && u > UINT32_MAX))
            return -1;
        if (dtype == TDC_U8) *(uint8_t *)out = (uint8_t)u;
        else if (dtype == TDC_U16) *(uint16_t *)out = (uint16_t)u;
        else if (dtype == TDC_U32) *(uint32_t *)out = (uint32_t)u;
        else *(uint64_t *)out = (uint64_t)u;
        return 1;
    }
    long long v = strtoll(s, &end, 10);
    if (*end || errno == ERANGE) return -1;
    if (dtype == TDC_I8 && (v < INT8_MIN || v > INT8_MAX)) return -1;
    if (dtype == TDC_I16 && (v < INT16_MIN || v > INT16_MAX)) return -1;
    if (dtype == TDC_I32 && (v < INT32_MIN || v > INT32_MAX)) return -1;
    if (dtype == TDC_I8) *(int8_t *)out = (int8_t)v;
    else if (dtype == TDC_I16) *(int16_t *)out = (int16_t)v;
    else if (dtype == TDC_I32) *(int32_t *)out = (int32_t)v;
    else *(int64_t *)out = (int64_t)v;
    return 1;
}

/* ---- weights file ----------------------------------------------------------------------------- */

typedef struct {
    char *name;
    uint32_t dtype, rank;
    int64_t shape[8];
    uint64_t offset, nbytes;
} wentry;

static size_t round_up(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

static int read_exact(FILE *f, void *buf, size_t n) { return fread(buf, 1, n, f) == n; }

static void weights_fail(const char *path, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

static void weights_fail(const char *path, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    die(EXIT_ERROR, "weights file '%s' %s", path, msg);
}

#define TRUNC(path) weights_fail(path, "is truncated")

/* Reads and validates a weights file into `buf` (TDC_WEIGHTS_BYTES, aligned). */
static void load_weights(const char *path, unsigned char *buf, int is_default) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (is_default)
            die(EXIT_ERROR, "cannot open weights file '%s': %s (it is looked for beside the executable; "
                "give --weights FILE)", path, strerror(errno));
        die(EXIT_ERROR, "cannot open weights file '%s': %s", path, strerror(errno));
    }
    int64_t fsize = file_size(f);
    unsigned char head[32];
    size_t got = fread(head, 1, sizeof head, f);
    if (got < sizeof head && ferror(f)) weights_fail(path, "cannot be read: %s", strerror(errno));
    if (got < 8 || memcmp(head, WEIGHTS_MAGIC, 8) != 0)
        weights_fail(path, "is not a tdc weights file (bad magic)");
    if (got < sizeof head) TRUNC(path);
    uint64_t payload = rd_u64(head + 8), n_entries = rd_u64(head + 16), checksum = rd_u64(head + 24);
    uint64_t pos = sizeof head;
    if (n_entries > (1u << 24) || (fsize >= 0 && n_entries * 28 > (uint64_t)fsize))
        weights_fail(path, "is truncated or corrupt (its header says %llu entries)", (unsigned long long)n_entries);
    wentry *es = calloc(n_entries ? n_entries : 1, sizeof *es);
    if (!es) die(EXIT_ERROR, "out of memory");
    for (uint64_t i = 0; i < n_entries; i++) {
        unsigned char b[16];
        if (!read_exact(f, b, 4)) TRUNC(path);
        uint32_t name_len = rd_u32(b);
        if (name_len > MAX_NAME) weights_fail(path, "is corrupt (entry %llu has a name of %u bytes)",
                                              (unsigned long long)i, name_len);
        es[i].name = malloc(name_len + 1);
        if (!es[i].name) die(EXIT_ERROR, "out of memory");
        if (!read_exact(f, es[i].name, name_len)) TRUNC(path);
        es[i].name[name_len] = 0;
        if (memchr(es[i].name, 0, name_len)) weights_fail(path, "is corrupt (entry %llu has a NUL in its name)",
                                                          (unsigned long long)i);
        if (!read_exact(f, b, 8)) TRUNC(path);
        es[i].dtype = rd_u32(b);
        es[i].rank = rd_u32(b + 4);
        if (es[i].rank > 8) weights_fail(path, "is corrupt (weight '%s' has rank %u)", es[i].name, es[i].rank);
        for (uint32_t d = 0; d < es[i].rank; d++) {
            if (!read_exact(f, b, 8)) TRUNC(path);
            es[i].shape[d] = (int64_t)rd_u64(b);
        }
        if (!read_exact(f, b, 16)) TRUNC(path);
        es[i].offset = rd_u64(b);
        es[i].nbytes = rd_u64(b + 8);
        pos += 4 + name_len + 8 + 8 * (uint64_t)es[i].rank + 16;
    }
    uint64_t data_off = round_up(pos);
    if (fsize >= 0) {
        if ((uint64_t)fsize < data_off || (uint64_t)fsize - data_off < payload)
            weights_fail(path, "is truncated (%lld bytes; its header says %llu)", (long long)fsize,
                         (unsigned long long)(data_off + payload));
        if ((uint64_t)fsize - data_off > payload)
            weights_fail(path, "is corrupt (%llu unexpected bytes at the end)",
                         (unsigned long long)((uint64_t)fsize - data_off - payload));
    }
    /* the entries must describe the model's weights exactly */
    char want[160], have[160];
    for (int j = 0; j < TDC_NUM_WEIGHTS; j++) {
        const tdc_tensor_info *t = &TDC_WEIGHTS[j];
        const wentry *e = NULL;
        for (uint64_t i = 0; i < n_entries && !e; i++)
            if (strcmp(es[i].name, t->name) == 0) e = &es[i];
        if (!e) weights_fail(path, "does not match model `%s`: it has no weight '%s'", TDC_MODEL, t->name);
        int same = e->dtype == (uint32_t)t->dtype && e->rank == (uint32_t)t->rank;
        for (int d = 0; same && d < t->rank; d++) same = e->shape[d] == t->shape[d];
        if (!same)
            weights_fail(path, "does not match model `%s`: weight '%s' is %s in the file, the model expects %s",
                         TDC_MODEL, t->name, type_str(have, sizeof have, (int)e->dtype, (int)e->rank, e->shape),
                         info_str(want, sizeof want, t));
        if (e->offset != (uint64_t)t->offset || e->nbytes != (uint64_t)t->nbytes)
            weights_fail(path, "does not match model `%s`: weight '%s' is at offset %llu (%llu bytes) in the "
                         "file, the model expects offset %lld (%lld bytes)", TDC_MODEL, t->name,
                         (unsigned long long)e->offset, (unsigned long long)e->nbytes, (long long)t->offset,
                         (long long)t->nbytes);
    }
    for (uint64_t i = 0; i < n_entries; i++) {
        int known = 0;
        for (int j = 0; j < TDC_NUM_WEIGHTS && !known; j++) known = strcmp(es[i].name, TDC_WEIGHTS[j].name) == 0;
        if (!known)
            weights_fail(path, "does not match model `%s`: the file has a weight '%s' the model does not",
                         TDC_MODEL, es[i].name);
        for (uint64_t k = 0; k < i; k++)
            if (strcmp(es[i].name, es[k].name) == 0)
                weights_fail(path, "is corrupt (weight '%s' appears twice)", es[i].name);
    }
    if (payload != (uint64_t)TDC_WEIGHTS_BYTES)
        weights_fail(path, "does not match model `%s`: it holds %llu bytes of weights, the model needs %lld",
                     TDC_MODEL, (unsigned long long)payload, (long long)TDC_WEIGHTS_BYTES);
    for (uint64_t skip = data_off - pos; skip > 0; skip--)
        if (fgetc(f) == EOF) TRUNC(path);
    if (!read_exact(f, buf, (size_t)payload)) TRUNC(path);
    if (fgetc(f) != EOF) weights_fail(path, "is corrupt (unexpected bytes at the end)");
    fclose(f);
    if (fnv1a64(buf, (size_t)payload) != checksum) weights_fail(path, "is corrupt (checksum mismatch)");
    for (uint64_t i = 0; i < n_entries; i++) free(es[i].name);
    free(es);
}

MAYBE_UNUSED static void save_weights(const char *path, const unsigned char *buf) {
    size_t n = 32;
    for (int j = 0; j < TDC_NUM_WEIGHTS; j++)
        n += 4 + strlen(TDC_WEIGHTS[j].name) + 8 + 8 * (size_t)TDC_WEIGHTS[j].rank + 16;
    size_t head_n = round_up(n);
    unsigned char *h = calloc(head_n, 1);
    if (!h) die(EXIT_ERROR, "out of memory");
    memcpy(h, WEIGHTS_MAGIC, 8);
    wr_u64(h + 8, (uint64_t)TDC_WEIGHTS_BYTES);
    wr_u64(h + 16, (uint64_t)TDC_NUM_WEIGHTS);
    wr_u64(h + 24, fnv1a64(buf, (size_t)TDC_WEIGHTS_BYTES));
    unsigned char *p = h + 32;
    for (int j = 0; j < TDC_NUM_WEIGHTS; j++) {
        const tdc_tensor_info *t = &TDC_WEIGHTS[j];
        size_t len = strlen(t->name);
        wr_u32(p, (uint32_t)len);
        memcpy(p + 4, t->name, len);
        p += 4 + len;
        wr_u32(p, (uint32_t)t->dtype);
        wr_u32(p + 4, (uint32_t)t->rank);
        p += 8;
        for (int d = 0; d < t->rank; d++, p += 8) wr_u64(p, (uint64_t)t->shape[d]);
        wr_u64(p, (uint64_t)t->offset);
        wr_u64(p + 8, (uint64_t)t->nbytes);
        p += 16;
    }
    write_atomic(path, h, head_n, buf, (size_t)TDC_WEIGHTS_BYTES, "the trained weights");
    free(h);
}

/* The default weights file: model.weights beside the executable (found through /proc/self/exe, so
   the bundle directory can be moved). */
static char *default_weights_path(const char *argv0) {
    static char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0 && (size_t)n < sizeof exe - 1) exe[n] = 0;
    else {
        snprintf(exe, sizeof exe, "%s", argv0);
    }
    char *slash = strrchr(exe, '/');
    size_t dir_n = slash ? (size_t)(slash - exe) + 1 : 0;
    size_t cap = dir_n + sizeof DEFAULT_WEIGHTS;
    char *p = malloc(cap);
    if (!p) die(EXIT_ERROR, "out of memory");
    snprintf(p, cap, "%.*s%s", (int)dir_n, exe, DEFAULT_WEIGHTS);
    return p;
}

/* ---- output summaries -------------------------------------------------------------------------- */

static double elem(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case TDC_F32: return ((const float *)p)[i];
    case TDC_F64: return ((const double *)p)[i];
    case TDC_I8: return ((const int8_t *)p)[i];
    case TDC_I32: return ((const int32_t *)p)[i];
    case TDC_I64: return (double)((const int64_t *)p)[i];
    case TDC_U8: return ((const uint8_t *)p)[i];
    case TDC_I16: return ((const int16_t *)p)[i];
    case TDC_U16: return ((const uint16_t *)p)[i];
    case TDC_U32: return ((const uint32_t *)p)[i];
    case TDC_U64: return (double)((const uint64_t *)p)[i];
    case TDC_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const unsigned char *)p)[i] != 0;
    }
}

static void print_elem(const void *p, int dtype, int64_t i) {
    if (dtype == TDC_I64) printf("%lld", (long long)((const int64_t *)p)[i]);
    else if (dtype == TDC_U64) printf("%llu", (unsigned long long)((const uint64_t *)p)[i]);
    else if (dtype == TDC_BOOL) printf("%s", ((const unsigned char *)p)[i] ? "true" : "false");
    else if (dtype == TDC_F32 || dtype == TDC_F64 || dtype == TDC_BF16) printf("%.6g", elem(p, dtype, i));
    else printf("%.0f", elem(p, dtype, i));
}

MAYBE_UNUSED static void print_summary(const tdc_tensor_info *t, const void *p) {
    char ts[160];
    int64_t n = elems_of(t->rank, t->shape);
    printf("%s: %s", t->name, info_str(ts, sizeof ts, t));
    if (n == 0) {
        printf(" (empty)\n");
        return;
    }
    double lo = INFINITY, hi = -INFINITY, sum = 0;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        double v = elem(p, t->dtype, i);
        if (isnan(v)) {
            nan = 1;
            continue;
        }
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        sum += v;
    }
    if (n > 1) printf(" min=%.6g max=%.6g mean=%.6g%s", lo, hi, sum / (double)n, nan ? " (has NaN)" : "");
    printf(" %s", n > 1 ? "[" : "");
    for (int64_t i = 0; i < n && i < PREVIEW; i++) {
        if (i) printf(", ");
        print_elem(p, t->dtype, i);
    }
    printf("%s\n", n > PREVIEW ? ", ...]" : (n > 1 ? "]" : ""));
}

/* ---- running ----------------------------------------------------------------------------------- */

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void print_times(double *t, long long n, const char *unit) {
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    double med = n % 2 ? t[n / 2] : (t[n / 2 - 1] + t[n / 2]) / 2;
    printf("time: median %.4f ms, min %.4f ms, max %.4f ms over %lld %s\n", med, t[0], t[n - 1], n, unit);
}

static void run_failed(int64_t rc, long long step, long long batch) __attribute__((noreturn));

/* step < 0: an inference run; batch < 0: the inputs are not split into batches */
static void run_failed(int64_t rc, long long step, long long batch) {
    char where[96] = "";
    if (step >= 0 && batch >= 0) snprintf(where, sizeof where, "step %lld (batch %lld): ", step + 1, batch);
    else if (step >= 0) snprintf(where, sizeof where, "step %lld: ", step + 1);
#ifdef TDC_ERROR_MESSAGE
    const char *m = TDC_ERROR_MESSAGE(rc);
    if (m) die(EXIT_ERROR, "%s%s", where, m);
#endif
    if (rc > 0)
        die(EXIT_ERROR, "%sa label is out of range (element %lld%s)", where, (long long)(rc - 1),
            step >= 0 ? " of the batch" : "");
    die(EXIT_ERROR, "%sthe model failed with error code %lld", where, (long long)rc);
}

/* ---- command line ------------------------------------------------------------------------------ */

static void usage_line(FILE *out) {
#if TDC_TRAINING
    fprintf(out, "usage: %s%s --input NAME=FILE.npy|NUMBER ... [--steps N] [--print-every K] [--weights FILE]\n"
                 "       [--save FILE] [--output NAME=FILE.npy ...] [--threads N [--hogwild]]%s%s\n",
            TDC_RANKS > 1 ? "mpiexec -n N " : "", prog,
            TDC_COMM ? " [--comm-timeout S]" : "", TDC_PROFILE ? " [--profile]" : "");
#else
    fprintf(out, "usage: %s --input NAME=FILE.npy|NUMBER ... [--output NAME=FILE.npy ...] [--weights FILE]\n"
                 "       [--repeat N]%s\n", prog, TDC_PROFILE ? " [--profile]" : "");
#endif
}

static void print_tensors(const char *title, const tdc_tensor_info *ts, int n) {
    char buf[160];
    printf("%s:\n", title);
    for (int i = 0; i < n; i++)
        printf("  %-16s %-24s .npy descr '%s'\n", ts[i].name, info_str(buf, sizeof buf, &ts[i]),
               DTYPES[ts[i].dtype].descr);
    if (n == 0) printf("  (none)\n");
}

#if TDC_PROFILE
#define PROFILE_HELP "  --profile           print each kernel's ops, time per call, share, GFLOP/s, GB/s and fraction\n" \
                     "                      of this host's FMA peak (measured for about a second) after the runs\n"
#else
#define PROFILE_HELP ""
#endif

static void help(const char *argv0) {
    usage_line(stdout);
#if TDC_TRAINING
    printf("\nTrains the tdc model `%s` (training: one call is one step that updates the weights).\n\n", TDC_MODEL);
#else
    printf("\nRuns the tdc model `%s` (inference).\n\n", TDC_MODEL);
#endif
    print_tensors("inputs", TDC_INPUTS, TDC_NUM_INPUTS);
    print_tensors("outputs", TDC_OUTPUTS, TDC_NUM_OUTPUTS);
    printf("weights: %d tensors, %lld bytes; ", (int)TDC_NUM_WEIGHTS, (long long)TDC_WEIGHTS_BYTES);
    char *dflt = default_weights_path(argv0);
#if TDC_EMBEDDED_WEIGHTS
    printf("embedded in the executable (--weights FILE reads a file instead)\n");
#else
    printf("read from %s (beside the executable), or --weights FILE\n", dflt);
#endif
    free(dflt);
    printf("\noptions:\n"
           "  --input NAME=FILE   a C-order .npy file (version 1, 2 or 3) whose dtype and shape match the\n"
           "                      input exactly; rank-0 inputs also take a number (--input lr=0.01).\n"
           "                      A bare FILE is accepted when there is one input.\n"
           "  --output NAME=FILE  write that output as .npy (written atomically); a bare FILE when there\n"
           "                      is one output. Every output is summarized on stdout.\n"
           "  --weights FILE      the weights file (tdc weights format)\n");
#if TDC_COMM
    printf("  --comm-timeout S    seconds to wait for another rank before stopping the job (default 30)\n");
#endif
#if TDC_TRAINING
    printf("  --steps N           training steps (default: one pass over the batches)\n"
           "  --print-every K     print the scalar outputs every K steps (default: about 10 lines)\n"
           "  --save FILE         where the trained weights go (default: %s in the current directory)\n"
           "  --threads N         threads for each step's kernels (default: the CPUs); with --hogwild, N threads\n"
           "                      each run whole steps at once\n"
           "  --hogwild           N threads train on their own batches and update the shared weights without\n"
           "                      locks (Hogwild); steps are dealt out round robin\n"
           "%s"
           "  -h, --help          this help\n"
           "\nThe learning rate (input lr) follows the schedule compiled in: %s, %d warm-up steps.\n"
           "\nAn input file for an input of shape [B, ...] may hold [k*B, ...]: it is split into k batches\n"
           "along dim 0 and step s uses batch s mod k. Rank-0 inputs are the same every step. The scalar\n"
           "outputs (e.g. the loss) are printed every K steps and at the last step.\n",
           PROFILE_HELP, DEFAULT_SAVE, TDC_SCHEDULE == 2 ? "cosine decay to 0 over the steps" : TDC_SCHEDULE == 1 ? "step decay" : "constant",
           TDC_WARMUP);
#else
    printf("  --repeat N          run N times; print the median, min and max time per run\n"
           "  --threads N         threads for the kernels (default: the CPUs)\n"
           "%s"
           "  -h, --help          this help\n"
           "\nAn input file for an input of shape [B, ...] may hold any number of samples [n, ...]: they run\n"
           "batch by batch (the last batch padded with zeros), and each output holds n rows.\n", PROFILE_HELP);
#endif
#if TDC_COMM
    if (TDC_RANKS > 1 && TDC_PARTITIONED)
        printf("\nPartitioned: compiled for %d ranks, each running its part of the step (its layers, its pieces\n"
               "of the weights); run it with mpiexec -n %d. Every rank reads the same batches; the messages\n"
               "between the ranks are compiled in, and rank 0 prints, writes the outputs and saves (the other\n"
               "ranks send it the weights they keep).\n", TDC_RANKS, TDC_RANKS);
    else if (TDC_RANKS > 1)
        printf("\nData parallel: compiled for %d ranks; run it with mpiexec -n %d. The input files hold global\n"
               "batches (%d x the inputs' dim 0): rank r takes the r-th part of each, gradients are averaged\n"
               "over the ranks every step, and rank 0 prints and saves.\n", TDC_RANKS, TDC_RANKS, TDC_RANKS);
#endif
    printf("\nexit status: 0 success, 1 error (input data, weights, a run-time error such as a label out\n"
           "of range, writing files), 2 usage error (options, input and output names).\n");
}

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void usage_error(const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    die(EXIT_USAGE, "%s (see --help)", msg);
}

static const char *names_of(const tdc_tensor_info *ts, int n) {
    static char buf[1024];
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < n && k < sizeof buf; i++)
        k += (size_t)snprintf(buf + k, sizeof buf - k, "%s%s", i ? ", " : "", ts[i].name);
    if (n == 0) snprintf(buf, sizeof buf, "none");
    return buf;
}

/* NAME=VALUE against a list of tensor names; a bare VALUE when there is exactly one. */
static int assign(const char *flag, const char *arg, const tdc_tensor_info *ts, int n, const char **value) {
    const char *eq = strchr(arg, '=');
    if (eq) {
        for (int i = 0; i < n; i++)
            if (strlen(ts[i].name) == (size_t)(eq - arg) && strncmp(ts[i].name, arg, (size_t)(eq - arg)) == 0) {
                *value = eq + 1;
                return i;
            }
    }
    if (n == 1 && (!eq || access(arg, F_OK) == 0)) {
        *value = arg;
        return 0;
    }
    const char *kind = strcmp(flag, "--input") == 0 ? "input" : "output";
    if (eq) usage_error("unknown %s '%.*s' (%ss: %s)", kind, (int)(eq - arg), arg, kind, names_of(ts, n));
    usage_error("%s needs NAME=FILE (%ss: %s)", flag, kind, names_of(ts, n));
}

static long long positive(const char *flag, const char *v) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno || x < 1 || x > 1000000000LL)
        usage_error("%s needs a positive integer, got '%s'", flag, v);
    return x;
}

typedef struct {
    const char *inputs[TDC_NUM_INPUTS + 1];
    const char *outputs[TDC_NUM_OUTPUTS + 1];
    const char *weights, *save;
    long long repeat, steps, print_every, threads;
    int hogwild, profile;
    double comm_timeout;
} options;

static void wrong_mode(const char *flag) {
#if TDC_TRAINING
    usage_error("%s is for inference models; `%s` is a training model", flag, TDC_MODEL);
#else
    usage_error("%s is for training models; `%s` is an inference model", flag, TDC_MODEL);
#endif
}

static void parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            help(argv[0]);
            exit(0);
        }
        if (!strcmp(a, "--hogwild")) {
            if (!TDC_TRAINING) wrong_mode(a);
            o->hogwild = 1;
            continue;
        }
        if (!strcmp(a, "--profile")) {
            if (!TDC_PROFILE) usage_error("`%s` was compiled without timers: build it with tdc compile --profile", TDC_MODEL);
            o->profile = 1;
            continue;
        }
        static const char *const flags[] = {"--input", "--output", "--weights", "--repeat", "--steps",
                                            "--print-every", "--save", "--comm-timeout", "--threads"};
        const char *flag = NULL, *val = NULL;
        for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++) {
            size_t n = strlen(flags[k]);
            if (strncmp(a, flags[k], n) == 0 && (a[n] == 0 || a[n] == '=')) {
                flag = flags[k];
                if (a[n] == '=') val = a + n + 1;
            }
        }
        if (!flag) {
            if (a[0] == '-') usage_error("unknown option '%s'", a);
            usage_error("unexpected argument '%s'", a);
        }
        if (!val) {
            if (i + 1 >= argc) usage_error("%s needs a value", flag);
            val = argv[++i];
        }
        if (!strcmp(flag, "--input")) {
            int k = assign(flag, val, TDC_INPUTS, TDC_NUM_INPUTS, &val);
            if (o->inputs[k]) usage_error("input '%s' is given twice", TDC_INPUTS[k].name);
            o->inputs[k] = val;
        } else if (!strcmp(flag, "--output")) {
            int k = assign(flag, val, TDC_OUTPUTS, TDC_NUM_OUTPUTS, &val);
            if (o->outputs[k]) usage_error("output '%s' is given twice", TDC_OUTPUTS[k].name);
            if (!*val) usage_error("--output %s needs a file name", TDC_OUTPUTS[k].name);
            o->outputs[k] = val;
        } else if (!strcmp(flag, "--weights")) {
            if (o->weights) usage_error("--weights is given twice");
            o->weights = val;
        } else if (!strcmp(flag, "--repeat")) {
            if (TDC_TRAINING) wrong_mode(flag);
            o->repeat = positive(flag, val);
        } else if (!strcmp(flag, "--steps")) {
            if (!TDC_TRAINING) wrong_mode(flag);
            o->steps = positive(flag, val);
        } else if (!strcmp(flag, "--print-every")) {
            if (!TDC_TRAINING) wrong_mode(flag);
            o->print_every = positive(flag, val);
        } else if (!strcmp(flag, "--threads")) {
            o->threads = positive(flag, val);
        } else if (!strcmp(flag, "--comm-timeout")) {
            if (!TDC_COMM) usage_error("--comm-timeout is for executables that talk to other ranks (tdc compile --ranks N)");
            char *end;
            o->comm_timeout = strtod(val, &end);
            if (*end || !(o->comm_timeout > 0)) usage_error("--comm-timeout must be a number of seconds > 0, got '%s'", val);
        } else {
            if (!TDC_TRAINING) wrong_mode(flag);
            o->save = val;
        }
    }
    if (o->hogwild && o->profile)
        usage_error("--profile times one thread's steps; it does not combine with --hogwild");
    if (o->hogwild && TDC_COMM)
        usage_error("--hogwild runs threads in one process; this executable was compiled for %d ranks", TDC_RANKS);
    char buf[160];
    for (int k = 0; k < TDC_NUM_INPUTS; k++)
        if (!o->inputs[k])
            usage_error("missing input '%s' (%s): give --input %s=FILE.npy", TDC_INPUTS[k].name,
                        info_str(buf, sizeof buf, &TDC_INPUTS[k]), TDC_INPUTS[k].name);
}

/* ---- inputs ------------------------------------------------------------------------------------- */

typedef struct {
    unsigned char *data;  /* all batches */
    int64_t batches;      /* k: the file holds k batches along dim 0 (the last one partial: inference) */
    int64_t rows;         /* samples in the file (dim 0), when it holds several batches or a partial one */
    unsigned char *stage; /* an aligned copy of the current batch, when k > 1 */
} input_data;

/* allow_batches: 0 the input's exact shape; 1 (training) k whole batches along dim 0; 2 (inference)
   any number of samples along dim 0, the last batch padded with zeros. */
static void load_input(int k, const char *spec, input_data *in, int allow_batches) {
    const tdc_tensor_info *t = &TDC_INPUTS[k];
    char what[320], want[160], got[160];
    snprintf(what, sizeof what, "input '%s'", t->name);
    in->batches = 1;
    if (t->rank == 0) {
        in->data = xalloc(8, what);
        int r = parse_literal(spec, t->dtype, in->data);
        if (r == 1 && TDC_TRAINING && !strcmp(t->name, "lr")) {   /* the training step's learning rate */
            double lr = elem(in->data, t->dtype, 0);
            if (!(lr >= 0) || isinf(lr))
                die(EXIT_ERROR, "%s: the learning rate must be a finite number >= 0, got '%s'", what, spec);
        }
        if (r == 1) return;
        if (r == -1) die(EXIT_ERROR, "%s: '%s' is not a %s value", what, spec, DTYPES[t->dtype].name);
    } else {
        char *end;
        (void)strtod(spec, &end);
        if (*spec && !*end && access(spec, F_OK) != 0)
            die(EXIT_ERROR, "%s is %s: a number is accepted only for rank-0 inputs; give a .npy file", what,
                info_str(want, sizeof want, t));
    }
    npy_file a;
    npy_open(&a, spec, what);
    int same = a.dtype == t->dtype && a.rank == t->rank;
    for (int d = 0; same && d < t->rank; d++) same = a.shape[d] == t->shape[d];
    if (!same && allow_batches && a.dtype == t->dtype && a.rank == t->rank && t->rank >= 1 && t->shape[0] > 0) {
        int trailing = 1;
        for (int d = 1; d < t->rank; d++) trailing &= a.shape[d] == t->shape[d];
        if (trailing) {
            if (a.shape[0] == 0 || (allow_batches == 1 && a.shape[0] % t->shape[0] != 0))
                die(EXIT_ERROR, "%s: '%s' holds %lld rows along dim 0, not a multiple of the batch size %lld "
                    "(expected %s, or k*%lld rows)", what, spec, (long long)a.shape[0], (long long)t->shape[0],
                    info_str(want, sizeof want, t), (long long)t->shape[0]);
            same = 1;
            in->rows = a.shape[0];
            in->batches = (a.shape[0] + t->shape[0] - 1) / t->shape[0];
        }
    }
    if (!same) {
        if (a.dtype < 0) {
            char sh[160];
            type_str(sh, sizeof sh, 0, a.rank > 8 ? 8 : a.rank, a.shape);
            die(EXIT_ERROR, "%s: expected %s, got an array of unsupported dtype '%s' and shape %s from '%s'", what,
                info_str(want, sizeof want, t), a.descr, strchr(sh, '['), spec);
        }
        if (a.rank > 8) die(EXIT_ERROR, "%s: expected %s, got a rank-%d array from '%s'", what,
                            info_str(want, sizeof want, t), a.rank, spec);
        die(EXIT_ERROR, "%s: expected %s, got %s from '%s'%s", what, info_str(want, sizeof want, t),
            type_str(got, sizeof got, a.dtype, a.rank, a.shape), spec,
            allow_batches && t->rank >= 1 ? " (dim 0 may be a multiple of the batch size)" : "");
    }
    npy_read_data(&a);
    in->data = a.data;
    if (in->rows) in->stage = xalloc((size_t)t->nbytes, what);
}

/* The current batch b of a file input into its aligned stage (rows past the file's end: zeros). */
static const void *stage_into(int k, const input_data *in, int64_t b, unsigned char *dst) {
    const tdc_tensor_info *t = &TDC_INPUTS[k];
    size_t row = (size_t)t->nbytes / (size_t)t->shape[0];
    int64_t first = b * t->shape[0], n = in->rows - first < t->shape[0] ? in->rows - first : t->shape[0];
    memcpy(dst, in->data + (size_t)first * row, (size_t)n * row);
    memset(dst + (size_t)n * row, 0, (size_t)(t->shape[0] - n) * row);
    return dst;
}

static const void *stage_batch(int k, const input_data *in, int64_t b) { return stage_into(k, in, b, in->stage); }

/* ---- the learning-rate schedule (tdc/runtime/schedule.py's formulas) -------------------------------- */

MAYBE_UNUSED static double scheduled_lr(double base, long long step, long long steps) {
    const long long warm = TDC_WARMUP;
    if (step < warm) return base * (double)(step + 1) / (double)warm;   /* linear warm-up */
    long long s = step - warm, decay = steps - warm > 1 ? steps - warm : 1;
    switch (TDC_SCHEDULE) {
    case 1: {
        long long size = TDC_STEP_SIZE > 0 ? TDC_STEP_SIZE : (decay / 3 > 1 ? decay / 3 : 1);
        return base * pow(TDC_GAMMA, (double)(s / size));
    }
    case 2: {
        double t = (double)(s < decay ? s : decay) / (double)decay;
        return base * 0.5 * (1.0 + cos(3.14159265358979323846 * t));
    }
    default:
        return base;
    }
}

/* ---- Hogwild: threads training at once on shared weights ------------------------------------------ */

typedef struct {
    int id, n;                      /* thread id of n */
    long long steps, every;
    int64_t global, batches;
    const input_data *ins;          /* the files, shared and read only */
    unsigned char *weights;         /* shared: every thread's updates go straight into them, unlocked */
    double *times;                  /* per step, shared (each step is written by one thread) */
    int lr_input;
    double base_lr;
} hogwild_job;

static pthread_mutex_t print_mu = PTHREAD_MUTEX_INITIALIZER;

MAYBE_UNUSED static void print_step(long long s, long long steps, void *const *outs) {
    printf("step %lld/%lld:", s + 1, steps);
    for (int k = 0; k < TDC_NUM_OUTPUTS; k++) {
        if (elems_of(TDC_OUTPUTS[k].rank, TDC_OUTPUTS[k].shape) != 1) continue;
        printf(" %s=", TDC_OUTPUTS[k].name);
        print_elem(outs[k], TDC_OUTPUTS[k].dtype, 0);
    }
    printf("\n");
    fflush(stdout);
}

typedef struct {
    const hogwild_job *job;
    int id;
} hogwild_thread;

/* Steps id, id + n, ... with buffers of this thread's own (scratch, staged batches, lr, outputs). */
MAYBE_UNUSED static void *hogwild_worker(void *arg) {
    const hogwild_thread *th = arg;
    const hogwild_job *j = th->job;
    const void *in_ptrs[TDC_NUM_INPUTS + 1];
    void *outs[TDC_NUM_OUTPUTS + 1];
    unsigned char *stage[TDC_NUM_INPUTS + 1];
    void *scratch = xalloc((size_t)TDC_SCRATCH_BYTES, "scratch memory");
    for (int k = 0; k < TDC_NUM_OUTPUTS; k++) outs[k] = xalloc((size_t)TDC_OUTPUTS[k].nbytes, "an output");
    for (int k = 0; k < TDC_NUM_INPUTS; k++) {
        stage[k] = xalloc((size_t)TDC_INPUTS[k].nbytes, "an input");
        if (!j->ins[k].rows) memcpy(stage[k], j->ins[k].data, (size_t)TDC_INPUTS[k].nbytes);
        in_ptrs[k] = stage[k];
    }
    for (long long s = th->id; s < j->steps; s += j->n) {
        for (int k = 0; k < TDC_NUM_INPUTS; k++)
            if (j->ins[k].rows) stage_into(k, &j->ins[k], (int64_t)(s % j->global), stage[k]);
        if (j->lr_input >= 0 && TDC_SCHEDULE + TDC_WARMUP > 0) {
            double lr = scheduled_lr(j->base_lr, s, j->steps);
            if (TDC_INPUTS[j->lr_input].dtype == TDC_F64) *(double *)stage[j->lr_input] = lr;
            else *(float *)stage[j->lr_input] = (float)lr;
        }
        double t0 = now_ms();
        int64_t rc = TDC_RUN(in_ptrs, outs, j->weights, scratch);
        j->times[s] = now_ms() - t0;
        if (rc != 0) run_failed(rc, s, j->batches > 1 ? (long long)(s % j->global) : -1);
        if ((s + 1) % j->every == 0 || s + 1 == j->steps) {
            pthread_mutex_lock(&print_mu);
            print_step(s, j->steps, outs);
            pthread_mutex_unlock(&print_mu);
        }
    }
    return NULL;
}

/* ---- main --------------------------------------------------------------------------------------- */

/* Present when the C runtime is linked in (a real bundle), absent in a bare test model. */
extern void tdc_runtime_set_threads(int64_t n) __attribute__((weak));

/* BLAS threads: TDC_BLAS_THREADS, default 1. Two OpenBLAS threads on this project's 2-vCPU
   machines made LeNet at batch 64 five times slower (24 ms vs 4.8 ms): they spin against each other. */
static void set_blas_threads(void) {
    if (!tdc_runtime_set_threads) return;
    const char *s = getenv("TDC_BLAS_THREADS");
    long n = s ? strtol(s, NULL, 10) : 1;
    tdc_runtime_set_threads(n > 0 ? n : 1);
}

#if TDC_COMM && TDC_PARTITIONED
/* Each weight's up-to-date value comes from the rank that keeps it (the others hold stale copies
   or none): sent to rank 0 before it saves. */
static void gather_weights(unsigned char *w) {
    for (int j = 0; j < TDC_NUM_WEIGHTS && world > 1; j++) {
        int owner = TDC_WEIGHT_OWNERS[j];
        if (owner == 0) continue;
        if (rank == owner) tdc_comm_send(w + TDC_WEIGHTS[j].offset, TDC_WEIGHTS[j].nbytes, 0, 20000 + j);
        else if (rank == 0) tdc_comm_recv(w + TDC_WEIGHTS[j].offset, TDC_WEIGHTS[j].nbytes, owner, 20000 + j);
    }
}
#endif

#if TDC_PROFILE
extern double tdc_fma_peak_gflops(int64_t threads, int64_t iters);

/* The kernels by the time they took over `calls` calls (the 15 costliest, then the rest), as
 * tdc run --profile prints them, against the FMA peak of `threads` cores measured here. */
static void print_profile(long long calls, long long threads) {
    int order[TDC_NUM_KERNELS + 1];
    double total = 0, flops = 0;
    for (int k = 0; k < TDC_NUM_KERNELS; k++) {
        order[k] = k;
        total += TDC_KERNEL_SECONDS[k];
        flops += TDC_KERNELS[k].flops;
    }
    for (int i = 1; i < TDC_NUM_KERNELS; i++)    /* insertion sort, slowest first */
        for (int j = i; j > 0 && TDC_KERNEL_SECONDS[order[j]] > TDC_KERNEL_SECONDS[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    int64_t iters = 1 << 16;
    double t0 = now_ms();
    tdc_fma_peak_gflops(threads, iters);
    iters = (int64_t)((double)iters * 300.0 / fmax(now_ms() - t0, 1e-3));
    double peak = 0;
    for (int r = 0; r < 3; r++) peak = fmax(peak, tdc_fma_peak_gflops(threads, iters > 1 << 16 ? iters : 1 << 16));
    if (calls < 1 || total <= 0) {
        printf("profile: no calls were timed\n");
        return;
    }
    printf("profile: %lld calls, %.3f ms per call in %d kernels; host FMA peak %.0f GFLOP/s on %lld core%s\n",
           calls, total / (double)calls * 1e3, (int)TDC_NUM_KERNELS, peak, threads, threads > 1 ? "s" : "");
    printf("%-14s %-34s %9s %6s %8s %7s %6s\n", "kernel", "ops", "us/call", "share", "GFLOP/s", "GB/s", "%peak");
    double rest = 0;
    for (int i = 0; i < TDC_NUM_KERNELS; i++) {
        const tdc_kernel_info *k = &TDC_KERNELS[order[i]];
        double secs = TDC_KERNEL_SECONDS[order[i]] / (double)calls;
        if (i >= 15) {
            rest += TDC_KERNEL_SECONDS[order[i]];
            continue;
        }
        double rate = secs > 0 ? k->flops / secs * 1e-9 : 0;
        printf("%-14s %-34.34s %9.1f %5.1f%% %8.2f %7.2f %5.1f%%\n", k->name, k->ops, secs * 1e6,
               100.0 * TDC_KERNEL_SECONDS[order[i]] / total, rate, secs > 0 ? (double)k->bytes / secs * 1e-9 : 0,
               peak > 0 ? 100.0 * rate / peak : 0);
    }
    if (TDC_NUM_KERNELS > 15) {
        char more[32];
        snprintf(more, sizeof more, "(%d more)", (int)TDC_NUM_KERNELS - 15);
        printf("%-49s %9.1f %5.1f%%\n", more, rest / (double)calls * 1e6, 100.0 * rest / total);
    }
    double rate = flops / (total / (double)calls) * 1e-9;
    printf("%-49s %9.1f %5.1f%% %8.2f %7s %5.1f%%\n", "step", total / (double)calls * 1e6, 100.0, rate, "",
           peak > 0 ? 100.0 * rate / peak : 0);
}
#endif

int main(int argc, char **argv) {
    set_blas_threads();
    if (argc > 0 && argv[0] && *argv[0]) {
        const char *s = strrchr(argv[0], '/');
        prog = s ? s + 1 : argv[0];
    }
    for (int i = 0; i < TDC_NUM_INPUTS; i++) check_info(&TDC_INPUTS[i], "input", 0);
    for (int i = 0; i < TDC_NUM_OUTPUTS; i++) check_info(&TDC_OUTPUTS[i], "output", 0);
    for (int i = 0; i < TDC_NUM_WEIGHTS; i++) check_info(&TDC_WEIGHTS[i], "weight", 1);

    options o;
    parse_args(argc, argv, &o);
    if (o.threads) {    /* Hogwild's threads each run whole steps; otherwise they split each step's kernels */
        char n[32];
        snprintf(n, sizeof n, "%lld", o.hogwild ? 1LL : o.threads);
        setenv("TDC_THREADS", n, 1);
    }
#if TDC_COMM
    world = (int)tdc_comm_init(o.comm_timeout);
    rank = (int)tdc_comm_rank();
    if (TDC_RANKS > 1 && world != TDC_RANKS)
        die_all(EXIT_USAGE, "`%s` was compiled for %d ranks but runs in a world of %d: start it with "
                "mpiexec -n %d", TDC_MODEL, TDC_RANKS, world, TDC_RANKS);
#endif

    input_data ins[TDC_NUM_INPUTS + 1];
    memset(ins, 0, sizeof ins);
    int64_t batches = 1;
    int batched_input = -1;
    for (int k = 0; k < TDC_NUM_INPUTS; k++) {
        load_input(k, o.inputs[k], &ins[k], TDC_TRAINING ? 1 : 2);
        if (ins[k].rows) {
            if (batched_input >= 0 && ins[k].rows != ins[batched_input].rows)
                die(EXIT_ERROR, "inputs '%s' and '%s' hold different numbers of samples (%lld and %lld)",
                    TDC_INPUTS[batched_input].name, TDC_INPUTS[k].name, (long long)ins[batched_input].rows,
                    (long long)ins[k].rows);
            if (batched_input >= 0 && ins[k].batches != batches)
                die(EXIT_ERROR, "inputs '%s' and '%s' hold different numbers of batches (%lld and %lld)",
                    TDC_INPUTS[batched_input].name, TDC_INPUTS[k].name, (long long)batches,
                    (long long)ins[k].batches);
            batches = ins[k].batches;
            batched_input = k;
        }
    }

    /* data parallelism: each step takes `world` batches of the files, one per rank */
    if (world > 1 && TDC_TRAINING && !TDC_PARTITIONED) {
        if (batched_input >= 0 && batches % world != 0)
            die_all(EXIT_ERROR, "input '%s' holds %lld batches of %lld rows: not a whole number of global batches "
                    "(%d ranks x %lld rows)", TDC_INPUTS[batched_input].name, (long long)batches,
                    (long long)TDC_INPUTS[batched_input].shape[0], world, (long long)TDC_INPUTS[batched_input].shape[0]);
        if (batched_input < 0)
            die_all(EXIT_ERROR, "with %d ranks the input files must hold the global batch (%d x the model's batch)",
                    world, world);
    }

    /* the places results go, checked before any (possibly long) run */
    for (int k = 0; k < TDC_NUM_OUTPUTS; k++) {
        char what[320];
        snprintf(what, sizeof what, "output '%s'", TDC_OUTPUTS[k].name);
        if (o.outputs[k]) check_writable(o.outputs[k], what);
    }
    if (TDC_TRAINING) check_writable(o.save ? o.save : DEFAULT_SAVE, "the trained weights");

    unsigned char *weights = xalloc((size_t)TDC_WEIGHTS_BYTES, "the weights");
    if (o.weights) load_weights(o.weights, weights, 0);
    else {
#if TDC_EMBEDDED_WEIGHTS
        memcpy(weights, TDC_WEIGHTS_DATA, (size_t)TDC_WEIGHTS_BYTES);
#else
        if (TDC_NUM_WEIGHTS > 0 || TDC_WEIGHTS_BYTES > 0) {
            char *path = default_weights_path(argc > 0 ? argv[0] : "model");
            load_weights(path, weights, 1);
            free(path);
        }
#endif
    }
    void *scratch = xalloc((size_t)TDC_SCRATCH_BYTES, "scratch memory");
    const void *in_ptrs[TDC_NUM_INPUTS + 1];
    void *out_ptrs[TDC_NUM_OUTPUTS + 1];
    for (int k = 0; k < TDC_NUM_INPUTS; k++) in_ptrs[k] = ins[k].data;
    for (int k = 0; k < TDC_NUM_OUTPUTS; k++) out_ptrs[k] = xalloc((size_t)TDC_OUTPUTS[k].nbytes, "an output");

#if TDC_TRAINING
    const int64_t global = TDC_PARTITIONED ? batches : batches / world;   /* global batches in the files */
    long long steps = o.steps ? o.steps : (long long)global;
    long long every = o.print_every ? o.print_every : (steps >= 10 ? steps / 10 : 1);
    const char *save = o.save ? o.save : DEFAULT_SAVE;
#if TDC_COMM
    tdc_comm_agree(TDC_FINGERPRINT ^ ((uint64_t)steps * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)batches << 32),
                   "the program and its arguments (model, --steps, input files)");
#endif
    double *times = malloc((size_t)steps * sizeof *times);
    if (!times) die(EXIT_ERROR, "out of memory (%lld steps)", steps);
    int lr_input = -1;
    for (int k = 0; k < TDC_NUM_INPUTS; k++)
        if (!strcmp(TDC_INPUTS[k].name, "lr") && TDC_INPUTS[k].rank == 0 && !ins[k].rows) lr_input = k;
    const double base_lr = lr_input >= 0 ? elem(ins[lr_input].data, TDC_INPUTS[lr_input].dtype, 0) : 0;
    if (rank == 0) {
        printf("training `%s`: %lld steps", TDC_MODEL, steps);
        if (global > 1) printf(" over %lld batches", (long long)global);
        if (world > 1 && TDC_PARTITIONED) printf(" partitioned over %d ranks", world);
        else if (world > 1) printf(" on %d ranks (%lld samples per rank and step)", world,
                                   (long long)(TDC_NUM_INPUTS ? TDC_INPUTS[batched_input < 0 ? 0 : batched_input].shape[0] : 0));
        printf("\n");
    }
    long long hog = o.hogwild ? (o.threads ? o.threads : sysconf(_SC_NPROCESSORS_ONLN)) : 0;
    if (hog > 0) {
        printf("hogwild: %lld threads train at once on the shared weights\n", hog);
        hogwild_job job = {0, (int)hog, steps, every, global, batches, ins, weights, times, lr_input, base_lr};
        pthread_t tids[64];
        hogwild_thread ths[64];
        if (hog > 64) usage_error("--threads is at most 64 with --hogwild, got %lld", hog);
        double t0 = now_ms();
        for (int t = 0; t < hog; t++) {
            ths[t] = (hogwild_thread){&job, t};
            if (t > 0 && pthread_create(&tids[t], NULL, hogwild_worker, &ths[t]) != 0)
                die(EXIT_ERROR, "cannot start thread %d of %lld", t, hog);
        }
        hogwild_worker(&ths[0]);
        for (int t = 1; t < hog; t++) pthread_join(tids[t], NULL);
        double wall = now_ms() - t0;
        printf("throughput: %.1f steps/s (%lld steps in %.1f ms)\n", (double)steps / wall * 1e3, steps, wall);
    }
    for (long long s = 0; s < steps && hog == 0; s++) {
        for (int k = 0; k < TDC_NUM_INPUTS; k++)    /* this rank's shard of global batch s */
            if (ins[k].rows)
                in_ptrs[k] = stage_batch(k, &ins[k], TDC_PARTITIONED ? (int64_t)(s % global)
                                                                     : (int64_t)(s % global) * world + rank);
        if (lr_input >= 0 && TDC_SCHEDULE + TDC_WARMUP > 0) {
            double lr = scheduled_lr(base_lr, s, steps);
            if (TDC_INPUTS[lr_input].dtype == TDC_F64) *(double *)ins[lr_input].data = lr;
            else *(float *)ins[lr_input].data = (float)lr;
        }
        double t0 = now_ms();
        int64_t rc = TDC_RUN(in_ptrs, out_ptrs, weights, scratch);
        times[s] = now_ms() - t0;
        if (rc != 0) run_failed(rc, s, batches > 1 ? (long long)(s % global) : -1);
        if (rank == 0 && ((s + 1) % every == 0 || s + 1 == steps)) print_step(s, steps, out_ptrs);
    }
#if TDC_COMM && TDC_PARTITIONED
    gather_weights(weights);
#endif
    if (rank == 0) {     /* every rank holds the same weights (a partitioned step's: gathered at rank 0) */
        print_times(times, steps, "steps");
#if TDC_COMM
        if (world > 1) {
            int64_t sent;
            double waited;
            tdc_comm_stats(&sent, &waited);
            printf("communication: %.3f MB sent per step, %.3f ms per step waiting\n", (double)sent / steps / 1e6,
                   waited * 1e3 / steps);
        }
#endif
        save_weights(save, weights);
        printf("saved the trained weights to %s\n", save);
#if TDC_PROFILE
        if (o.profile) print_profile(steps, o.threads ? o.threads : sysconf(_SC_NPROCESSORS_ONLN));
#endif
    }
#else
    /* A whole file of samples runs batch by batch; each output then holds a row per sample. */
    const int64_t rows = batched_input >= 0 ? ins[batched_input].rows : 0;
    const int64_t per_batch = batched_input >= 0 ? TDC_INPUTS[batched_input].shape[0] : 1;
    tdc_tensor_info full[TDC_NUM_OUTPUTS + 1];
    void *results[TDC_NUM_OUTPUTS + 1];
    for (int k = 0; k < TDC_NUM_OUTPUTS; k++) {
        full[k] = TDC_OUTPUTS[k];
        results[k] = out_ptrs[k];
        if (!rows) continue;
        if (full[k].rank < 1 || full[k].shape[0] != per_batch)
            die(EXIT_ERROR, "output '%s' is not one row per sample (its dim 0 is not the batch %lld): give inputs of "
                "exactly one batch", full[k].name, (long long)per_batch);
        full[k].nbytes = full[k].nbytes / per_batch * rows;
        full[k].shape[0] = rows;
        results[k] = xalloc((size_t)full[k].nbytes, "an output");
    }
    long long runs = o.repeat ? o.repeat : 1;
    double *times = malloc((size_t)runs * sizeof *times);
    if (!times) die(EXIT_ERROR, "out of memory (%lld runs)", runs);
    for (long long r = 0; r < runs; r++) {
        double t0 = now_ms();
        for (int64_t b = 0; b < batches; b++) {
            for (int k = 0; k < TDC_NUM_INPUTS; k++)
                if (ins[k].rows) in_ptrs[k] = stage_batch(k, &ins[k], b);
            int64_t rc = TDC_RUN(in_ptrs, out_ptrs, weights, scratch);
            if (rc != 0) run_failed(rc, -1, rows ? (long long)b : -1);
            for (int k = 0; k < TDC_NUM_OUTPUTS && rows; k++) {    /* the batch's rows, without the padding */
                size_t row = (size_t)TDC_OUTPUTS[k].nbytes / (size_t)per_batch;
                int64_t n = rows - b * per_batch < per_batch ? rows - b * per_batch : per_batch;
                memcpy((unsigned char *)results[k] + (size_t)(b * per_batch) * row, out_ptrs[k], (size_t)n * row);
            }
        }
        times[r] = now_ms() - t0;
    }
    if (rank == 0) {      /* a partitioned step's outputs are rank 0's */
        if (rows && batches > 1) printf("ran %lld batches of %lld (%lld samples)\n", (long long)batches,
                                        (long long)per_batch, (long long)rows);
        for (int k = 0; k < TDC_NUM_OUTPUTS; k++) print_summary(&full[k], results[k]);
        if (o.repeat) print_times(times, runs, "runs");
#if TDC_PROFILE
        if (o.profile) print_profile(runs * batches, o.threads ? o.threads : sysconf(_SC_NPROCESSORS_ONLN));
#endif
    }
#endif
    for (int k = 0; k < TDC_NUM_OUTPUTS; k++) {
        if (!o.outputs[k] || rank != 0) continue;
        char what[320];
        snprintf(what, sizeof what, "output '%s'", TDC_OUTPUTS[k].name);
#if TDC_TRAINING
        write_npy(o.outputs[k], &TDC_OUTPUTS[k], out_ptrs[k], what);
#else
        write_npy(o.outputs[k], &full[k], results[k], what);
#endif
        printf("wrote %s to %s\n", TDC_OUTPUTS[k].name, o.outputs[k]);
    }
    free(times);
#if TDC_COMM
    tdc_comm_finish();
#endif
    return 0;
}
