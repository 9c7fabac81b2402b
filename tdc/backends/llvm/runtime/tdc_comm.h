/* tdc runtime: communication between ranks (comm.c, over MPI). See comm.c for what each does.
 * op: 0 sum, 1 mean, 2 max, 3 min. algo: 0 MPI_Allreduce, 1 ring, 2 recursive doubling, 3 tree. */
#ifndef TDC_COMM_H
#define TDC_COMM_H
#include <stdint.h>

int64_t tdc_comm_init(double timeout_s);   /* returns the world size */
int64_t tdc_comm_rank(void);
int64_t tdc_comm_size(void);
void tdc_comm_stats(int64_t *bytes_sent, double *wait_seconds);
void tdc_comm_agree(uint64_t fingerprint, const char *what);
void tdc_comm_abort(const char *message);
void tdc_comm_stop(void);     /* end the communication thread (before MPI_Finalize) */
void tdc_comm_finish(void);   /* stop, then MPI_Finalize (native executables) */

void tdc_comm_allreduce_start_f32(const float *x, float *h, int64_t n, int64_t op, int64_t algo, int64_t slot);
void tdc_comm_allreduce_start_f64(const double *x, double *h, int64_t n, int64_t op, int64_t algo, int64_t slot);
void tdc_comm_wait(int64_t slot);
void tdc_comm_allreduce_f32(const float *x, float *out, int64_t n, int64_t op, int64_t algo);
void tdc_comm_allreduce_f64(const double *x, double *out, int64_t n, int64_t op, int64_t algo);
void tdc_comm_broadcast(const void *x, void *out, int64_t bytes, int64_t root);
void tdc_comm_reduce_to_f32(const float *x, float *out, int64_t n, int64_t root);
void tdc_comm_reduce_to_f64(const double *x, double *out, int64_t n, int64_t root);
void tdc_comm_send(const void *x, int64_t bytes, int64_t dst, int64_t tag);   /* returns at once */
void tdc_comm_recv(void *out, int64_t bytes, int64_t src, int64_t tag);
/* out = every rank's x side by side: `outer` rows, rank q's piece sizes[q] * inner bytes per row */
void tdc_comm_allgather(const void *x, void *out, int64_t outer, int64_t inner, const int64_t *sizes, int64_t p);

#endif
