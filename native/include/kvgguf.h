// kvgguf native helpers: post-processing of attention scores and cell selection for KV-cache eviction.
//
// All arrays are dense, row-major and owned by the caller; no function allocates memory that outlives the call
// or keeps a pointer to its arguments. Functions return KVGGUF_OK (0) or a negative kvgguf_status; they never
// abort on bad input.
#ifndef KVGGUF_H
#define KVGGUF_H

#include <stdint.h>

#ifdef _WIN32
#    ifdef KVGGUF_BUILD
#        define KVGGUF_API __declspec(dllexport)
#    else
#        define KVGGUF_API __declspec(dllimport)
#    endif
#else
#    define KVGGUF_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum kvgguf_status {
    KVGGUF_OK              =  0,
    KVGGUF_ERR_ARG         = -1, // a NULL pointer, a negative size or an unknown enum value
    KVGGUF_ERR_KERNEL      = -2, // max-pool kernel not odd and positive
    KVGGUF_ERR_BUDGET      = -3, // more cells protected than the budget allows, or budget larger than the row
    KVGGUF_ERR_NO_MEMORY   = -4, // a scratch allocation failed
};

enum kvgguf_reduce {
    KVGGUF_REDUCE_MAX  = 0,
    KVGGUF_REDUCE_MEAN = 1,
};

// Version of this API; bumped when a signature changes.
KVGGUF_API int32_t kvgguf_api_version(void);

// 1-D max-pool along the last dimension of scores[n_rows][n], "same" padding (window clipped at the row ends).
// kernel must be odd and >= 1 (1 copies). out[n_rows][n] must not overlap scores.
KVGGUF_API int32_t kvgguf_maxpool1d(const float * scores, float * out, int64_t n_rows, int64_t n, int32_t kernel);

// Reduce groups of consecutive rows: scores[n_groups * group][n] -> out[n_groups][n], by max or mean over the
// `group` rows of each group. group = n_rows reduces everything to one row; NaN is treated as -inf for max.
KVGGUF_API int32_t kvgguf_reduce_rows(const float * scores, float * out, int64_t n_groups, int64_t group, int64_t n,
                                      int32_t op);

// For every row of scores[n_rows][n], choose exactly k cells: every cell with protect[c] != 0 (shared by all rows;
// protect may be NULL), then the highest-scoring others (ties: the lower index wins, NaN ranks lowest).
// Writes the chosen indices of each row in ascending order to keep[n_rows][k].
// Returns KVGGUF_ERR_BUDGET when k > n or when more than k cells are protected.
KVGGUF_API int32_t kvgguf_select_topk(const float * scores, const uint8_t * protect, int64_t n_rows, int64_t n,
                                      int64_t k, int32_t * keep);

// LazyEviction's per-step state update (decode-time eviction, one decoded token at `step`): for every row
// r < n_rows (a layer's KV head) and cell c < n_cells where the token's attention attention[r][c] >= alpha,
//   recurrence[r][c] = max(recurrence[r][c], step - last_seen[r][c]);  last_seen[r][c] = step.
// Other cells are left as they are. Rows start attention_stride (attention) and state_stride (last_seen and
// recurrence) elements apart, so that the state can be rows of a larger buffer; both strides must be >= n_cells.
KVGGUF_API int32_t kvgguf_lazy_observe(const float * attention, int64_t attention_stride, int32_t * last_seen,
                                       int32_t * recurrence, int64_t state_stride, int64_t n_rows, int64_t n_cells,
                                       int32_t step, float alpha);

#ifdef __cplusplus
}
#endif

#endif // KVGGUF_H
