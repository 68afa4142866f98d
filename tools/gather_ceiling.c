/* The rate at which this machine gathers random rows of a table: the ceiling of an embedding lookup.
 * A plain loop, one memcpy per row, the rows split over OpenMP threads, with an optional software
 * prefetch of the row `prefetch` lookups ahead. Built and run by gather_ceiling.py:
 *     gather_ceiling ROWS DIM LOOKUPS THREADS PREFETCH REPEATS
 * prints the median seconds of REPEATS gathers of LOOKUPS rows of DIM floats, each drawing new ids;
 * exits 1 if the last gather's rows are not the table's rows of its ids. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double seconds_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec + now.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s ROWS DIM LOOKUPS THREADS PREFETCH REPEATS\n", argv[0]);
        return 2;
    }
    long rows = atol(argv[1]), dim = atol(argv[2]), lookups = atol(argv[3]);
    int threads = atoi(argv[4]), prefetch = atoi(argv[5]), repeats = atoi(argv[6]);
    float *table = aligned_alloc(64, rows * dim * sizeof(float));
    float *out = aligned_alloc(64, lookups * dim * sizeof(float));
    int64_t *ids = malloc(lookups * sizeof(int64_t));
    double *times = malloc(repeats * sizeof(double));
    if (!table || !out || !ids || !times) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (long i = 0; i < rows * dim; i++) table[i] = (float)i;  /* pages faulted in before timing */
    omp_set_num_threads(threads);
    uint64_t state = 88172645463325252ull;
    for (int r = 0; r < repeats; r++) {
        for (long i = 0; i < lookups; i++) {  /* xorshift: new ids for every gather */
            state ^= state << 13, state ^= state >> 7, state ^= state << 17;
            ids[i] = (int64_t)(state % (uint64_t)rows);
        }
        double start = seconds_now();
#pragma omp parallel for schedule(static)
        for (long i = 0; i < lookups; i++) {
            if (prefetch && i + prefetch < lookups) __builtin_prefetch(table + ids[i + prefetch] * dim);
            memcpy(out + i * dim, table + ids[i] * dim, dim * sizeof(float));
        }
        times[r] = seconds_now() - start;
    }
    for (long i = 0; i < lookups; i++) {
        for (long j = 0; j < dim; j++) {
            if (out[i * dim + j] != table[ids[i] * dim + j]) {
                fprintf(stderr, "row %ld: gathered the wrong values\n", i);
                return 1;
            }
        }
    }
    qsort(times, repeats, sizeof(double), by_value);
    printf("%.9f\n", times[repeats / 2]);
    return 0;
}
