/*
 * Running top-k selection over tiles of an image x caption score matrix (offline mining).
 *
 * Each query (an image for i2t, a caption for t2i) owns a queue: `cap` slots of (score, id) and a
 * threshold. A score enters the queue only if it beats the threshold; when the queue is full it is
 * compacted to its k best entries and the threshold becomes the k-th best score. Most scores of a
 * large matrix fail the first comparison, so a tile costs little more than one read.
 *
 * Order: an entry is better than another if its score is higher, or the scores are equal and its
 * id is lower. Ids reach each queue in increasing order (the caller walks tiles that way), so a new
 * score equal to the threshold always loses and "beats the threshold" is a plain `>`. The result is
 * therefore exactly the first k entries of a stable descending sort, ties included.
 *
 * Every function works on a range of queues and touches nothing else, so callers run disjoint
 * ranges in parallel threads without locks. Compiled on first use by topk.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline int better(float av, int32_t aid, float bv, int32_t bid) {
    return av > bv || (av == bv && aid < bid);
}

static inline void swap_entries(float *v, int32_t *id, int64_t a, int64_t b) {
    float tv = v[a];
    int32_t tid = id[a];
    v[a] = v[b];
    id[a] = id[b];
    v[b] = tv;
    id[b] = tid;
}

/* Partition v/id[lo..hi] (inclusive, distinct keys, hi > lo) around a median-of-three pivot;
 * returns the pivot's final position p: better entries in [lo, p), worse in (p, hi].
 * Branch-free Lomuto: the swap is unconditional and only the store index depends on the
 * comparison, because a mispredicted branch per entry would cost more than the swap. */
static int64_t partition(float *v, int32_t *id, int64_t lo, int64_t hi) {
    int64_t mid = lo + (hi - lo) / 2;
    /* Median of (lo, mid, hi) moved to hi. */
    if (better(v[mid], id[mid], v[lo], id[lo])) swap_entries(v, id, mid, lo);
    if (better(v[hi], id[hi], v[lo], id[lo])) swap_entries(v, id, hi, lo);
    if (better(v[mid], id[mid], v[hi], id[hi])) swap_entries(v, id, hi, mid);
    float pv = v[hi];
    int32_t pid = id[hi];
    int64_t store = lo;
    for (int64_t i = lo; i < hi; i++) {
        float tv = v[i];
        int32_t tid = id[i];
        int64_t is_better = (tv > pv) | ((tv == pv) & (tid < pid));
        /* Entries in [store, i) are all worse, so swapping with v[store] is harmless when
         * tv is worse too. */
        v[i] = v[store];
        id[i] = id[store];
        v[store] = tv;
        id[store] = tid;
        store += is_better;
    }
    swap_entries(v, id, store, hi);
    return store;
}

/* Reorder v/id[lo..hi] (inclusive, distinct keys) so that position `nth` holds the entry of that
 * rank, better entries before it and worse after (quickselect). */
static void select_nth(float *v, int32_t *id, int64_t lo, int64_t hi, int64_t nth) {
    while (lo < hi) {
        int64_t p = partition(v, id, lo, hi);
        if (p == nth) return;
        if (nth < p) hi = p - 1;
        else lo = p + 1;
    }
}

/* Unsigned key whose ascending order is the descending order of the float (finite floats). */
static inline uint32_t descending_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (u == 0x80000000u) u = 0;  /* -0.0 ranks as 0.0, as in every comparison */
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~u;
}

static inline float score_of_key(uint32_t key) {
    uint32_t w = ~key, u = (w & 0x80000000u) ? (w & 0x7fffffffu) : ~w;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Sort v/id[0..n) best first. LSD radix sort on the score (4 byte passes: branch-free, unlike a
 * comparison sort), then runs of equal scores ordered by id. Scratch: 3 arrays of n. */
static void sort_best_first(float *v, int32_t *id, int64_t n, uint32_t *key, uint32_t *key2,
                            int32_t *id2) {
    for (int64_t i = 0; i < n; i++) key[i] = descending_key(v[i]);
    uint32_t *src_k = key, *dst_k = key2;
    int32_t *src_i = id, *dst_i = id2;
    for (int shift = 0; shift < 32; shift += 8) {
        int64_t count[256] = {0};
        for (int64_t i = 0; i < n; i++) count[(src_k[i] >> shift) & 255]++;
        int64_t pos = 0;
        for (int b = 0; b < 256; b++) {
            int64_t c = count[b];
            count[b] = pos;
            pos += c;
        }
        for (int64_t i = 0; i < n; i++) {
            int64_t at = count[(src_k[i] >> shift) & 255]++;
            dst_k[at] = src_k[i];
            dst_i[at] = src_i[i];
        }
        uint32_t *tk = src_k; src_k = dst_k; dst_k = tk;
        int32_t *ti = src_i; src_i = dst_i; dst_i = ti;
    }
    /* After 4 passes the sorted data is back in key/id. Equal scores: lower id first. */
    for (int64_t a = 1; a < n; a++) {
        if (key[a] != key[a - 1] || id[a] > id[a - 1]) continue;
        uint32_t k0 = key[a];
        int32_t t = id[a];
        int64_t b = a - 1;
        while (b >= 0 && key[b] == k0 && id[b] > t) {
            id[b + 1] = id[b];
            b--;
        }
        id[b + 1] = t;
    }
    (void)v;
}

/* Make room in a queue holding n entries (all finite): keep between k and max_keep of them and
 * raise the threshold. Keeps every entry scoring at least t, where t is the lower edge of the
 * histogram bin holding the k-th best score, so at least k entries are kept and the threshold
 * becomes t: a later score equal to t has a higher id than all of them and loses. Branch-free
 * passes (min/max, histogram, count, filter); the exact quickselect is the fallback when the bins
 * cannot split the scores finely enough (ties, or too many in the k-th best's bin). */
#define BINS 64
static void compact(float *v, int32_t *id, int32_t *fill, float *thr, int64_t n, int64_t k,
                    int64_t max_keep) {
    float lo = v[0], hi = v[0];
    for (int64_t i = 1; i < n; i++) {
        lo = v[i] < lo ? v[i] : lo;
        hi = v[i] > hi ? v[i] : hi;
    }
    if (hi > lo) {
        int64_t hist[BINS] = {0};
        float scale = (float)BINS / (hi - lo);
        for (int64_t i = 0; i < n; i++) {
            int64_t b = (int64_t)((v[i] - lo) * scale);
            hist[b < BINS ? b : BINS - 1]++;
        }
        int64_t b = BINS - 1, above = hist[b];
        while (above < k && b > 0) above += hist[--b];
        float t = lo + (float)b / scale;
        int64_t kept = 0;
        for (int64_t i = 0; i < n; i++) kept += v[i] >= t;
        if (kept >= k && kept <= max_keep) {
            int64_t store = 0;
            for (int64_t i = 0; i < n; i++) {
                float tv = v[i];
                int32_t tid = id[i];
                v[store] = tv;
                id[store] = tid;
                store += tv >= t;
            }
            *fill = (int32_t)store;
            *thr = t;
            return;
        }
    }
    select_nth(v, id, 0, n - 1, k - 1);
    *fill = (int32_t)k;
    *thr = v[k - 1];
}

/* Offer (score, id), known to beat the threshold, to a caption queue with a free slot at
 * `fill`; compacts as soon as the queue is full, so the next offer finds a free slot too. */
static inline void append(float *qv, int32_t *qid, int32_t *fill, float *thr, int64_t cap, int64_t k,
                          float score, int32_t id) {
    int32_t f = *fill;
    qv[f] = score;
    qid[f] = id;
    *fill = ++f;
    if (f == cap) compact(qv, qid, fill, thr, cap, k, cap - 1);
}

/* Scores are compared GROUP at a time (one vector compare with AVX-512 or AVX2); most groups on
 * real data hold no score above its threshold. Queues have at least k + GROUP_MAX slots. */
#define GROUP_MAX 16
#define STRIP 128
#if defined(__AVX512F__)
#include <immintrin.h>
#define GROUP 16
static inline unsigned above_mask(const float *s, float thr) {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(s), _mm512_set1_ps(thr), _CMP_GT_OQ);
}
static inline unsigned above_each_mask(const float *s, const float *thr) {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(s), _mm512_loadu_ps(thr), _CMP_GT_OQ);
}
#elif defined(__AVX2__)
#include <immintrin.h>
#define GROUP 8
static inline unsigned above_mask(const float *s, float thr) {
    __m256 cmp = _mm256_cmp_ps(_mm256_loadu_ps(s), _mm256_set1_ps(thr), _CMP_GT_OQ);
    return (unsigned)_mm256_movemask_ps(cmp);
}
static inline unsigned above_each_mask(const float *s, const float *thr) {
    __m256 cmp = _mm256_cmp_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(thr), _CMP_GT_OQ);
    return (unsigned)_mm256_movemask_ps(cmp);
}
#else
#define GROUP 8
static inline unsigned above_mask(const float *s, float thr) {
    unsigned m = 0;
    for (int t = 0; t < GROUP; t++) m |= (unsigned)(s[t] > thr) << t;
    return m;
}
static inline unsigned above_each_mask(const float *s, const float *thr) {
    unsigned m = 0;
    for (int t = 0; t < GROUP; t++) m |= (unsigned)(s[t] > thr[t]) << t;
    return m;
}
#endif

/* Bits of the group starting at tile column j0 that fall in [own_lo, own_hi). */
static inline unsigned own_bits(int64_t j0, int64_t own_lo, int64_t own_hi) {
    unsigned bits = 0;
    for (int64_t j = own_lo; j < own_hi; j++)
        if (j >= j0 && j < j0 + GROUP) bits |= 1u << (j - j0);
    return bits;
}

/* Append the scores row[j0 + bit] of the set bits of m to an image queue with room for GROUP. */
static inline void append_group(float *qv, int32_t *qid, int32_t *fill, const float *row, int64_t j0,
                                int32_t id0, unsigned m) {
    int32_t f = *fill;
#if defined(__AVX512F__)
    __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(id0 + (int32_t)j0),
                                   _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    _mm512_mask_compressstoreu_ps(qv + f, (__mmask16)m, _mm512_loadu_ps(row + j0));
    _mm512_mask_compressstoreu_epi32(qid + f, (__mmask16)m, ids);
    f += __builtin_popcount(m);
#else
    while (m) {
        int64_t j = j0 + __builtin_ctz(m);
        m &= m - 1;
        qv[f] = row[j];
        qid[f] = id0 + (int32_t)j;
        f++;
    }
#endif
    *fill = f;
}

/*
 * One tile of scores: rows = images row0.., columns = captions col0.., row-major, n_cols wide.
 * i2t: tile rows [r_lo, r_hi) feed queues r (the caller's queues for this block of images);
 *      an image's own captions (c / caps_per_image == image) are skipped.
 * t2i: tile columns [c_lo, c_hi) feed the caption queues cq0 + j (cq0 = col0 when the queues
 *      cover all captions, less when they cover one group); the own image is skipped.
 * A non-positive k skips that direction.
 */
void aoq_scan_tile(const float *tile, int64_t n_rows, int64_t n_cols, int64_t row0, int64_t col0,
                   int64_t cq0, int64_t caps_per_image,
                   float *rv, int32_t *rid, int32_t *rfill, float *rthr, int64_t rcap, int64_t rk,
                   int64_t r_lo, int64_t r_hi,
                   float *cv, int32_t *cid, int32_t *cfill, float *cthr, int64_t ccap, int64_t ck,
                   int64_t c_lo, int64_t c_hi) {
    if (rk > 0) {
        for (int64_t r = r_lo; r < r_hi; r++) {
            const float *row = tile + r * n_cols;
            /* The image's own captions, as tile columns. */
            int64_t own_lo = (row0 + r) * caps_per_image - col0, own_hi = own_lo + caps_per_image;
            float *qv = rv + r * rcap;
            int32_t *qid = rid + r * rcap;
            int64_t j0 = 0;
            for (; j0 + GROUP <= n_cols; j0 += GROUP) {
                unsigned m = above_mask(row + j0, rthr[r]);
                if (!m) continue;
                /* Room for a whole group: the threshold then stays fixed within the group. */
                if (rfill[r] > rcap - GROUP) {
                    compact(qv, qid, rfill + r, rthr + r, rfill[r], rk, rcap - GROUP);
                    m = above_mask(row + j0, rthr[r]);
                }
                if (j0 < own_hi && j0 + GROUP > own_lo) m &= ~own_bits(j0, own_lo, own_hi);
                append_group(qv, qid, rfill + r, row, j0, (int32_t)col0, m);
            }
            for (int64_t j = j0; j < n_cols; j++) {
                if (!(row[j] > rthr[r]) || (j >= own_lo && j < own_hi)) continue;
                if (rfill[r] == rcap) compact(qv, qid, rfill + r, rthr + r, rcap, rk, rcap - 1);
                if (row[j] > rthr[r]) append_group(qv, qid, rfill + r, row, j, (int32_t)col0, 1u);
            }
        }
    }
    if (ck > 0) {
        /* Column strips: the queue tails a strip writes stay in the core's cache while all the
         * tile's rows go by (a whole tile's worth of caption queues would not). */
        for (int64_t s0 = c_lo; s0 < c_hi; s0 += STRIP) {
            int64_t s1 = s0 + STRIP < c_hi ? s0 + STRIP : c_hi;
            for (int64_t r = 0; r < n_rows; r++) {
                const float *row = tile + r * n_cols;
                int32_t image = (int32_t)(row0 + r);
                int64_t own_lo = (row0 + r) * caps_per_image - col0, own_hi = own_lo + caps_per_image;
                int64_t j0 = s0;
                for (; j0 + GROUP <= s1; j0 += GROUP) {
                    unsigned m = above_each_mask(row + j0, cthr + cq0 + j0);
                    while (m) {
                        int64_t j = j0 + __builtin_ctz(m);
                        m &= m - 1;
                        int64_t c = cq0 + j;
                        if (j < own_lo || j >= own_hi)
                            append(cv + c * ccap, cid + c * ccap, cfill + c, cthr + c, ccap, ck, row[j],
                                   image);
                    }
                }
                for (int64_t j = j0; j < s1; j++) {
                    int64_t c = cq0 + j;
                    if (row[j] > cthr[c] && (j < own_lo || j >= own_hi))
                        append(cv + c * ccap, cid + c * ccap, cfill + c, cthr + c, ccap, ck, row[j], image);
                }
            }
        }
    }
}

/*
 * Queues [q_lo, q_hi): write the ids of each queue's k best entries, best first, to
 * out[(q - q_lo) * k ...], and their scores to out_scores likewise unless it is NULL.
 * Returns 0, 1 if a queue holds fewer than k entries (a caller bug), or 2 if scratch memory
 * could not be allocated.
 */
int aoq_finalize(float *qv, int32_t *qid, const int32_t *fill, int64_t cap, int64_t k,
                 int64_t q_lo, int64_t q_hi, int32_t *out, float *out_scores) {
    uint32_t *key = malloc(cap * sizeof *key), *key2 = malloc(cap * sizeof *key2);
    int32_t *id2 = malloc(cap * sizeof *id2);
    int status = (key && key2 && id2) ? 0 : 2;
    for (int64_t q = q_lo; q < q_hi && status == 0; q++) {
        int64_t n = fill[q];
        if (n < k) {
            status = 1;
            break;
        }
        int32_t *id = qid + q * cap;
        sort_best_first(qv + q * cap, id, n, key, key2, id2);
        memcpy(out + (q - q_lo) * k, id, k * sizeof *id);
        if (out_scores != NULL)
            for (int64_t a = 0; a < k; a++) out_scores[(q - q_lo) * k + a] = score_of_key(key[a]);
    }
    free(key);
    free(key2);
    free(id2);
    return status;
}

/*
 * Rows [r_lo, r_hi): merge n_lists sorted lists of length k (row r, list l at offset
 * (r * n_lists + l) * k of scores/ids; list l holds only ids below those of list l + 1) into the
 * k best, written to out[(r - r_lo) * k ...]. Equal scores: the earlier list (lower ids) first.
 */
void aoq_merge_sorted(const float *scores, const int32_t *ids, int64_t n_lists, int64_t k,
                      int64_t r_lo, int64_t r_hi, int32_t *out) {
    int64_t head[64];
    for (int64_t r = r_lo; r < r_hi; r++) {
        const float *s = scores + r * n_lists * k;
        const int32_t *id = ids + r * n_lists * k;
        for (int64_t l = 0; l < n_lists; l++) head[l] = 0;
        for (int64_t a = 0; a < k; a++) {
            int64_t best = -1;
            for (int64_t l = 0; l < n_lists; l++) {
                if (head[l] == k) continue;
                if (best < 0 || s[l * k + head[l]] > s[best * k + head[best]]) best = l;
            }
            out[(r - r_lo) * k + a] = id[best * k + head[best]];
            head[best]++;
        }
    }
}

/*
 * Evaluation ranks in one read of a tile (rows = images, columns = captions, row-major), with the
 * reference's tie rule: a ranking sorts scores descending and puts the higher index first among
 * equal scores, so an item ties against the ground truth only when its index is higher.
 *   row_counts[r] += #{j : tile[r][j] > row_thr[r]}, but >= for the columns j >= row_from[r];
 *   col_counts[j] += #{r : tile[r][j] > col_thr[j]}, but >= for the rows r with j < col_below[r].
 * Each row is read in at most three branch-free segments, so the compiler vectorises the counts.
 */
#define COUNT_SEGMENT(ROW_OP, COL_OP)                                                     \
    for (int64_t j = lo; j < hi; j++) {                                                   \
        float s = row[j];                                                                 \
        above += s ROW_OP t;                                                              \
        col_counts[j] += s COL_OP col_thr[j];                                             \
    }

static inline int32_t count_segment(const float *row, float t, const float *col_thr,
                                    int32_t *col_counts, int64_t lo, int64_t hi, int row_ge,
                                    int col_ge) {
    int32_t above = 0;
    if (row_ge && col_ge) {
        COUNT_SEGMENT(>=, >=)
    } else if (row_ge) {
        COUNT_SEGMENT(>=, >)
    } else if (col_ge) {
        COUNT_SEGMENT(>, >=)
    } else {
        COUNT_SEGMENT(>, >)
    }
    return above;
}

static inline int64_t clamp_index(int64_t x, int64_t n) { return x < 0 ? 0 : (x > n ? n : x); }

void aoq_count_ranks(const float *tile, int64_t n_rows, int64_t n_cols, const float *row_thr,
                     const int64_t *row_from, const float *col_thr, const int64_t *col_below,
                     int64_t *row_counts, int32_t *col_counts) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float *row = tile + r * n_cols;
        float t = row_thr[r];
        int64_t a = clamp_index(row_from[r], n_cols), b = clamp_index(col_below[r], n_cols);
        int64_t cuts[4] = {0, a < b ? a : b, a < b ? b : a, n_cols};
        int32_t above = 0;
        for (int seg = 0; seg < 3; seg++) {
            int64_t lo = cuts[seg], hi = cuts[seg + 1];
            if (hi > lo)
                above += count_segment(row, t, col_thr, col_counts, lo, hi, lo >= a, lo < b);
        }
        row_counts[r] += above;
    }
}
