// Score post-processing and top-k cell selection; see include/kvgguf.h for the contract of each function.
#include "kvgguf.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int32_t kvgguf_api_version(void) {
    return 1;
}

int32_t kvgguf_maxpool1d(const float * scores, float * out, int64_t n_rows, int64_t n, int32_t kernel) {
    if (!scores || !out || n_rows < 0 || n < 0) {
        return KVGGUF_ERR_ARG;
    }
    if (kernel < 1 || kernel % 2 == 0) {
        return KVGGUF_ERR_KERNEL;
    }
    const int64_t half = kernel / 2;
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * src = scores + r * n;
        float * dst = out + r * n;
        for (int64_t i = 0; i < n; ++i) {
            const int64_t lo = i - half < 0 ? 0 : i - half;
            const int64_t hi = i + half >= n ? n - 1 : i + half;
            float best = -INFINITY;
            for (int64_t j = lo; j <= hi; ++j) {
                if (src[j] > best) {
                    best = src[j];
                }
            }
            dst[i] = best;
        }
    }
    return KVGGUF_OK;
}

int32_t kvgguf_reduce_rows(const float * scores, float * out, int64_t n_groups, int64_t group, int64_t n, int32_t op) {
    if (!scores || !out || n_groups < 0 || group < 1 || n < 0) {
        return KVGGUF_ERR_ARG;
    }
    if (op != KVGGUF_REDUCE_MAX && op != KVGGUF_REDUCE_MEAN) {
        return KVGGUF_ERR_ARG;
    }
    for (int64_t g = 0; g < n_groups; ++g) {
        float * dst = out + g * n;
        const float * first = scores + g * group * n;
        if (op == KVGGUF_REDUCE_MAX) {
            for (int64_t i = 0; i < n; ++i) {
                dst[i] = isnan(first[i]) ? -INFINITY : first[i];
            }
            for (int64_t r = 1; r < group; ++r) {
                const float * src = first + r * n;
                for (int64_t i = 0; i < n; ++i) {
                    if (src[i] > dst[i]) {
                        dst[i] = src[i];
                    }
                }
            }
        } else {
            memset(dst, 0, (size_t) n * sizeof(float));
            for (int64_t r = 0; r < group; ++r) {
                const float * src = first + r * n;
                for (int64_t i = 0; i < n; ++i) {
                    dst[i] += src[i];
                }
            }
            for (int64_t i = 0; i < n; ++i) {
                dst[i] /= (float) group;
            }
        }
    }
    return KVGGUF_OK;
}

struct scored_cell {
    float   score;
    int32_t index;
};

// descending score, NaN last, then ascending index
static int compare_scored_cells(const void * a, const void * b) {
    const struct scored_cell * x = (const struct scored_cell *) a;
    const struct scored_cell * y = (const struct scored_cell *) b;
    const int x_nan = isnan(x->score);
    const int y_nan = isnan(y->score);
    if (x_nan != y_nan) {
        return x_nan - y_nan;
    }
    if (!x_nan && x->score != y->score) {
        return x->score > y->score ? -1 : 1;
    }
    return (x->index > y->index) - (x->index < y->index);
}

int32_t kvgguf_select_topk(const float * scores, const uint8_t * protect, int64_t n_rows, int64_t n, int64_t k,
                           int32_t * keep) {
    if (!scores || !keep || n_rows < 0 || n < 0 || k < 0 || n > INT32_MAX) {
        return KVGGUF_ERR_ARG;
    }
    if (k > n) {
        return KVGGUF_ERR_BUDGET;
    }
    int64_t n_protected = 0;
    for (int64_t i = 0; protect && i < n; ++i) {
        n_protected += protect[i] != 0;
    }
    if (n_protected > k) {
        return KVGGUF_ERR_BUDGET;
    }

    struct scored_cell * candidates = malloc((size_t) (n > 0 ? n : 1) * sizeof(struct scored_cell));
    uint8_t * chosen = malloc((size_t) (n > 0 ? n : 1));
    if (!candidates || !chosen) {
        free(candidates);
        free(chosen);
        return KVGGUF_ERR_NO_MEMORY;
    }

    const int64_t n_free = k - n_protected;
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * row = scores + r * n;
        int64_t n_candidates = 0;
        for (int64_t i = 0; i < n; ++i) {
            chosen[i] = protect && protect[i];
            if (!chosen[i]) {
                candidates[n_candidates].score = row[i];
                candidates[n_candidates].index = (int32_t) i;
                ++n_candidates;
            }
        }
        qsort(candidates, (size_t) n_candidates, sizeof(struct scored_cell), compare_scored_cells);
        for (int64_t j = 0; j < n_free; ++j) {
            chosen[candidates[j].index] = 1;
        }
        int32_t * dst = keep + r * k;
        int64_t m = 0;
        for (int64_t i = 0; i < n; ++i) {
            if (chosen[i]) {
                dst[m++] = (int32_t) i;
            }
        }
    }

    free(candidates);
    free(chosen);
    return KVGGUF_OK;
}
