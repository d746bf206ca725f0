// Per-cell state of decode-time eviction policies, updated at every decoded token; see include/kvgguf.h.
#include "kvgguf.h"

#include <stddef.h>

int32_t kvgguf_lazy_observe(const float * attention, int64_t attention_stride, int32_t * last_seen,
                            int32_t * recurrence, int64_t state_stride, int64_t n_rows, int64_t n_cells,
                            int32_t step, float alpha) {
    if (!attention || !last_seen || !recurrence || n_rows < 0 || n_cells < 0 || attention_stride < n_cells ||
        state_stride < n_cells) {
        return KVGGUF_ERR_ARG;
    }
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * att = attention + r * attention_stride;
        int32_t * seen = last_seen + r * state_stride;
        int32_t * mri = recurrence + r * state_stride;
        for (int64_t c = 0; c < n_cells; ++c) {
            // branch-free: the gap is 0 where the cell was not attended, which leaves both values as they are
            const int32_t gap = (att[c] >= alpha) ? step - seen[c] : 0;
            mri[c] = gap > mri[c] ? gap : mri[c];
            seen[c] += gap;
        }
    }
    return KVGGUF_OK;
}
