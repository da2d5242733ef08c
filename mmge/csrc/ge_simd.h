/*
 * The vector helpers of GE's CPU kernels: LANES floats as one GCC vector
 * (eight channels of one position in ge_conv_gather.c, eight values of a
 * row in ge_mlp.c), a lane-wise sigmoid, an 8x8 transpose, and CLONED,
 * which compiles a hot function once per x86-64 vector width. Included by
 * the C files that build into mmge/_ge_cpu*.so.
 */
#ifndef MMGE_GE_SIMD_H
#define MMGE_GE_SIMD_H

#include <stdint.h>
#include <string.h>

#define LANES 8

/* The kernel is compiled three times, for AVX-512 (x86-64-v4), AVX2
 * (x86-64-v3) and baseline x86-64, and the loader picks the best the CPU
 * runs: one build serves every machine, and the vector code runs 2-3x
 * faster on the wider units. Its helpers are inlined into each copy. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(MMGE_NO_CLONES)
#define CLONED \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONED
#endif
#define INLINE static inline __attribute__((always_inline))

/* LANES floats; V(p) needs p 32-byte aligned (the scratch buffers are),
 * load and store do not */
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef double vd __attribute__((vector_size(LANES * sizeof(double))));
typedef int vi __attribute__((vector_size(LANES * sizeof(int))));

#define V(p) (*(vf *)(p))

INLINE vf splat(float v) { return (vf){0} + v; }

/* v where keep > 0, else 0 */
INLINE vf where_positive(vf keep, vf v) {
  return (vf)((vi)v & (keep > splat(0.f)));
}

INLINE vd widen(vf v) { return __builtin_convertvector(v, vd); }

/* 1 / (1 + exp(-v)) lane by lane: exp by range reduction to
 * r in [-ln2 / 2, ln2 / 2] and Cephes' expf polynomial (about 1 ulp), so
 * that the gate costs a few vector operations, not a libm call per value */
INLINE vf sigmoid(vf v) {
  const vf lo = splat(-87.f), hi = splat(88.f);
  vf x = -v;
  vi m = x > lo;
  x = (vf)(((vi)x & m) | ((vi)lo & ~m));
  m = x < hi;
  x = (vf)(((vi)x & m) | ((vi)hi & ~m));
  /* n = round(x / ln2): adding 1.5 * 2^23 rounds to an integer */
  const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf e = p * r * r + r + 1.f;
  /* times 2^n: n added to the exponent bits */
  const vi bits = ((vi)e) + (__builtin_convertvector(n, vi) << 23);
  return 1.f / (1.f + (vf)bits);
}

INLINE vf load(const float *p) {
  vf v;
  memcpy(&v, p, sizeof(vf));
  return v;
}

INLINE void store(float *p, vf v) { memcpy(p, &v, sizeof(vf)); }

INLINE float sum_lanes(vf v) {
  float s = 0.f;
  for (int k = 0; k < LANES; ++k) s += v[k];
  return s;
}

/* 8x8 transpose: out[j][k] = in[k][j] (the AVX unpack / shuffle /
 * permute2f128 sequence, written with GCC's generic shuffles) */
INLINE void transpose8(vf *r) {
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
  const vf t0 = SHUF(r[0], r[1], 0, 8, 1, 9, 4, 12, 5, 13);
  const vf t1 = SHUF(r[0], r[1], 2, 10, 3, 11, 6, 14, 7, 15);
  const vf t2 = SHUF(r[2], r[3], 0, 8, 1, 9, 4, 12, 5, 13);
  const vf t3 = SHUF(r[2], r[3], 2, 10, 3, 11, 6, 14, 7, 15);
  const vf t4 = SHUF(r[4], r[5], 0, 8, 1, 9, 4, 12, 5, 13);
  const vf t5 = SHUF(r[4], r[5], 2, 10, 3, 11, 6, 14, 7, 15);
  const vf t6 = SHUF(r[6], r[7], 0, 8, 1, 9, 4, 12, 5, 13);
  const vf t7 = SHUF(r[6], r[7], 2, 10, 3, 11, 6, 14, 7, 15);
  const vf u0 = SHUF(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
  const vf u1 = SHUF(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  const vf u2 = SHUF(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
  const vf u3 = SHUF(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  const vf u4 = SHUF(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
  const vf u5 = SHUF(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
  const vf u6 = SHUF(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
  const vf u7 = SHUF(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
  r[0] = SHUF(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11);
  r[1] = SHUF(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11);
  r[2] = SHUF(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11);
  r[3] = SHUF(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11);
  r[4] = SHUF(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15);
  r[5] = SHUF(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15);
  r[6] = SHUF(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15);
  r[7] = SHUF(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15);
#undef SHUF
}

#endif /* MMGE_GE_SIMD_H */
