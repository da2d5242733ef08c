/*
 * What the C files of GE's CPU kernels share: the OpenMP dispatcher.
 * Included by ge_cpu.c and ge_conv_gather.c, which build into one library.
 */
#ifndef MMGE_GE_PARALLEL_H
#define MMGE_GE_PARALLEL_H

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* below this many elements a call runs on the calling thread */
#define MIN_PARALLEL 32768

/* fn(args, first, last, scratch): planes [first, last), with its own
 * scratch buffer of the size the caller asked for */
typedef void (*plane_fn)(const void *args, int64_t first, int64_t last,
                         float *scratch);

/* Run fn over planes [0, planes) split in up to `threads` contiguous
 * ranges, each with `scratch` floats of its own, on OpenMP threads.
 * Loaded after PyTorch, this library binds to PyTorch's libgomp.so.1, so
 * the kernels share its thread pool instead of competing with it. Returns
 * 0, or 1 if the scratch memory could not be allocated (nothing was
 * written then). */
static inline int for_planes(plane_fn fn, const void *args, int64_t planes,
                             int64_t plane_size, int64_t scratch,
                             int threads) {
  if (threads > planes) threads = (int)planes;
  if (threads < 2 || planes * plane_size < MIN_PARALLEL) threads = 1;
  /* whole cache lines per thread: threads writing to one line slow each
   * other down several times over */
  scratch = (scratch + 15) / 16 * 16;
  float *buf = (float *)aligned_alloc(
      64, sizeof(float) * (size_t)(scratch * threads + 16));
  if (!buf) return 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    fn(args, planes * t / n, planes * (t + 1) / n, buf + scratch * t);
  }
  free(buf);
  return 0;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

#endif /* MMGE_GE_PARALLEL_H */
