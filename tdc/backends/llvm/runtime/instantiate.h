/* Compile the template part of the family file TDC_SELF twice: for float (_f32) and double
 * (_f64). Included at the end of a family file's first part (see internal.h). */
#define TDC_TEMPLATE

#define T float
#define UT uint32_t   /* the unsigned integer of T's width */
#define SFX(name) name##_f32
#define GEMM scipy_cblas_sgemm
#define GEMV scipy_cblas_sgemv
#include TDC_SELF
#undef T
#undef UT
#undef SFX
#undef GEMM
#undef GEMV

#define T double
#define UT uint64_t
#define SFX(name) name##_f64
#define GEMM scipy_cblas_dgemm
#define GEMV scipy_cblas_dgemv
#include TDC_SELF
#undef T
#undef UT
#undef SFX
#undef GEMM
#undef GEMV
