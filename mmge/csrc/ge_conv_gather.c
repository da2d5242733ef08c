/*
 * GE-theta's parametric gather on the CPU (mmge/models/layers/cpu_kernels.py:
 * conv_gather and conv_gather_backward), on contiguous float32 NCHW tensors.
 *
 * The gather of extent e = 2^L chains L levels of: a depthwise 3x3
 * convolution of stride 2 and padding 1 (no bias), a batch norm, and a ReLU
 * (at every level but the last; at the last too in GE-theta-plus; each
 * level says). Every step acts on each channel alone (the batch norm's
 * statistics are per channel), so the work is split over blocks of LANES
 * channels. A block's planes are copied, a row at a time, into a
 * channels-last scratch layout (position-major, LANES channels per
 * position), where every operation is one vector operation per position
 * whatever the map's size: the 7x7 maps of ResNet's last stage cost no more
 * per cell than the 56x56 ones. For one block the kernel reads its
 * full-resolution planes once and runs the whole chain on buffers of a
 * quarter of that size and less, which stay in the cache: one memory pass
 * instead of a dozen ATen calls. The backward recomputes the chain the same
 * way, runs it backwards, then reads the block's planes again (still in the
 * cache) for the first convolution's backward, and writes the gradient of
 * the gather's input together with the excite's direct term
 * grad * resize(gate).
 *
 * The full-resolution tensors (x, grad, dx, the excite's identity and
 * output) may instead all be channels-last, (N, H, W, C) in memory
 * (x_cl). The full-resolution work then leaves the per-block loop: two
 * passes over units of whole rows, each for all channels, read and write
 * every cell's channels in one run (cl_prepass_units before the chain,
 * cl_postpass_units after it in backward), and the per-block chain runs
 * in between on what they keep per block.
 */
#include <math.h>
#include <string.h>

#include "ge_excite.h"
#include "ge_parallel.h"
#include "ge_simd.h"

#define MAX_LEVELS 16

/* Sums in float over runs of CHUNK positions, added up in double: exact
 * enough, and few double operations */
#define CHUNK 64

/* A padded map (h + 2) x (w + 2) positions, channels-last: zero its border */
INLINE void zero_border(float *plane, int64_t h, int64_t w) {
  const int64_t stride = (w + 2) * LANES;
  memset(plane, 0, sizeof(float) * stride);
  memset(plane + (h + 1) * stride, 0, sizeof(float) * stride);
  for (int64_t p = 1; p <= h; ++p) {
    V(plane + p * stride) = splat(0.f);
    V(plane + p * stride + (w + 1) * LANES) = splat(0.f);
  }
}

/* out (ho, wo) <- depthwise 3x3 stride-2 convolution (kernels K[0..9)) of a
 * padded map of width w */
INLINE void conv_forward(const float *plane, int64_t w, const vf *K,
                         float *out, int64_t ho, int64_t wo) {
  const int64_t stride = (w + 2) * LANES;
  for (int64_t i = 0; i < ho; ++i) {
    const float *r0 = plane + 2 * i * stride, *r1 = r0 + stride,
                *r2 = r1 + stride;
    float *o = out + i * wo * LANES;
    for (int64_t j = 0; j < wo; ++j) {
      const int64_t at = 2 * j * LANES;
      V(o + j * LANES) =
          K[0] * V(r0 + at) + K[1] * V(r0 + at + LANES) +
          K[2] * V(r0 + at + 2 * LANES) + K[3] * V(r1 + at) +
          K[4] * V(r1 + at + LANES) + K[5] * V(r1 + at + 2 * LANES) +
          K[6] * V(r2 + at) + K[7] * V(r2 + at + LANES) +
          K[8] * V(r2 + at + 2 * LANES);
    }
  }
}

/* Backward of conv_forward for the output gradient dz (ho, wo): adds the
 * kernels' gradient to dK and, when dplane is given, the input's gradient
 * to dplane (a padded map of the input's size, zeroed by the caller; its
 * border collects gradient that is never read). */
INLINE void conv_backward(const float *plane, float *dplane, int64_t w,
                          const vf *K, const float *dz, int64_t ho,
                          int64_t wo, vd *dK) {
  const int64_t stride = (w + 2) * LANES;
  for (int64_t i = 0; i < ho; ++i) {
    vf s[9];
    for (int t = 0; t < 9; ++t) s[t] = splat(0.f);
    for (int64_t j = 0; j < wo; ++j) {
      const vf d = V(dz + (i * wo + j) * LANES);
      for (int64_t a = 0; a < 3; ++a) {
        const int64_t at = (2 * i + a) * stride + 2 * j * LANES;
        for (int64_t b = 0; b < 3; ++b) {
          s[3 * a + b] += d * V(plane + at + b * LANES);
          if (dplane) V(dplane + at + b * LANES) += K[3 * a + b] * d;
        }
      }
    }
    for (int t = 0; t < 9; ++t) dK[t] += widen(s[t]);
  }
}

/* What a channels-last call keeps per block between the full-resolution
 * passes (cl_prepass_units, cl_postpass_units) and the per-block chain:
 * level 1's kernels K1, the affine A, B of what the pass reads; the fused
 * norm's statistics for its backward (nmean, ninvstd) and its mean terms
 * md, mdx; the sums of y and y^2 (a fused training norm's forward) and of
 * the norm backward's dy and dy * xhat (nsum, nsumx) */
struct cl_block {
  vf K1[9], A, B, nmean, ninvstd, md, mdx;
  vd sums[2], nsum, nsumx;
};

struct conv_gather_args {
  /* the gather's input is y = scale[c] * x + shift[c] (x without scale);
   * x: (N, C, H, W) */
  const float *x, *scale, *shift;
  /* level l = 1 .. L at index l - 1, read where the modules keep them:
   * weight[l - 1], the convolution's kernels (C, 9); gamma, beta, the batch
   * norm's weight and bias (C each; NULL: 1 and 0); rmean, rvar, its
   * running mean and variance (C each; NULL where the level trains); eps;
   * train: the level normalises with the batch's statistics (else with
   * the running ones); relu: the level ends with a ReLU */
  const float *const *weight, *const *gamma, *const *beta, *const *rmean,
      *const *rvar;
  const double *eps;
  const int *train, *relu;
  int levels;
  int64_t N, C, H, W;
  /* the nearest resize of the gate (hL, wL) to (H, W) */
  const int64_t *row_index, *col_index;
  /* backward: grad (N, C, H, W), the gradient of the excite's output; gate
   * and dcontext (N, C, hL, wL), or NULL: then gate = sigmoid(context) and
   * dcontext = grad_gate * gate * (1 - gate) (GE-theta). grad NULL (with
   * dcontext, without gate): the gather's backward alone, dx without the
   * excite's direct term */
  const float *grad, *gate, *dcontext;
  /* the (N, C, hL, wL) tensors (gate, dcontext, context, grad_gate) are
   * channels-last in memory, (N, hL, wL, C), when small_cl: the layout of
   * the rows GE-theta-plus's MLP multiplies */
  int small_cl;
  /* x, grad, dx and the excite's identity and output are channels-last,
   * (N, H, W, C) in memory */
  int cl;
  /* level 1's convolution output, in the kernel's own layout (blocks of
   * LANES channels, (N, h1, w1, LANES) each): saved by a first call
   * (level1_out) for a second (level1_in), which then skips reading the
   * input for it (GE-theta-plus's backward runs the kernel twice) */
  const float *level1_in;
  float *level1_out;
  /* forward: each level's convolution output (N, C, h_l, w_l), before its
   * norm, in x's layout (channels-last with cl), at raw[l - 1] (the array
   * NULL, or an entry NULL: not written) */
  float *const *raw;
  /* outputs, each optional: context (N, C, hL, wL); the batch mean and
   * biased variance of the training levels (L, C); grad_gate, the adjoint
   * of the resize applied to grad * y (N, C, hL, wL); the backward (when
   * dx is given): dx = grad * resize(gate) + the gather's backward
   * (N, C, H, W), dweight (L, C, 9), dgamma and dbeta (L, C) */
  float *context, *mean, *var, *grad_gate, *dx, *dweight, *dgamma, *dbeta;
  /* the batch norm that makes y from x, fused (optional). Forward
   * (norm_batch): y = norm(x) with the batch's statistics, which the kernel
   * computes in its pass over x (scale and shift are NULL), with the
   * norm's weight and bias norm_gamma, norm_beta (NULL: 1, 0) and
   * norm_eps, and returns in norm_mean and norm_var (C), the biased
   * variance. Backward (norm_invstd): y = scale * x + shift as given, with
   * the statistics norm_mean_in and norm_invstd (C; the batch's when
   * norm_train); dx is then the gradient of x through the norm, and
   * norm_dgamma, norm_dbeta (C) those of its weight and bias. */
  const float *norm_gamma, *norm_beta, *norm_mean_in, *norm_invstd;
  double norm_eps;
  int norm_batch, norm_train;
  float *norm_mean, *norm_var, *norm_dgamma, *norm_dbeta;
  /* a forward's update of the training levels' running statistics, per
   * level (the arrays NULL, or an entry NULL: none): run_mean, run_var
   * (C each) become (1 - momentum) * themselves + momentum * the batch's
   * mean and unbiased variance, and run_count (num_batches_tracked) is
   * incremented, as a batch norm module's forward does */
  float *const *run_mean, *const *run_var;
  int64_t *const *run_count;
  const double *run_momentum;
  /* the excite in the same call (forward only; see ge_excite_spec) and
   * the buffers the blocks fill for it: the context (GE-theta: its
   * sigmoid) channels-last, (N * hL * wL, C), and y's scale and shift
   * (2, C) */
  const struct ge_excite_spec *excite;
  float *ctx_rows, *affine;
  /* the blocks make the gate's gradient only (to grad_gate), no chain:
   * GE-theta-plus's backward given the forward's context */
  int gg_only;
  /* map sizes per level (level 0: the input) and scratch offsets */
  int64_t h[MAX_LEVELS + 1], w[MAX_LEVELS + 1];
  int64_t off_z[MAX_LEVELS + 1], off_dz[MAX_LEVELS + 1];
  int64_t off_a[MAX_LEVELS + 1], off_da[MAX_LEVELS + 1];
  int64_t off_rows, off_ctx, off_gate, off_gg, off_dctx, scratch;
  /* channels-last: per block (by its index), its struct cl_block, and
   * z (level 1's convolution output, (N, h1, w1, LANES); in backward then
   * its gradient), gg and gate ((N, hL, wL, LANES) each), s (S1 and S2
   * of cl_row_sums, 2 x (N, hL, wL, LANES)); the units of the passes:
   * cl_units per sample, the rows cl_rows[k] .. cl_rows[k + 1] - 1, and
   * their sums per block (cl_part: 9 per block and unit); scratch per
   * thread: a row's sums, 9 per block (off_a[0]) */
  struct cl_block *clb;
  float *cl_z, *cl_gg, *cl_gate, *cl_s;
  /* their strides from block to block (cl_pitch): z's, gg's and gate's,
   * s's (S1 and S2 of a block mg apart) */
  int64_t cl_pz, cl_pg, cl_ps;
  int64_t *cl_rows, cl_units;
  vd *cl_part;
};

/* Scratch per thread (floats, LANES per position, each buffer whole cache
 * lines): a[0], da[0]: one padded full-resolution map and its gradient;
 * rows: 3 rows of W positions; z[l], dz[l] (l >= 1): the level's
 * convolution output for the N maps and its gradient; a[l], da[l]
 * (1 <= l < L): the next convolution's padded input maps and their
 * gradient; ctx, gate, gg, dctx: (N, hL, wL) each. */
static void plan(struct conv_gather_args *a) {
  const int64_t L = a->levels, N = a->N;
  int64_t at = 0;
#define TAKE(n) (at += ((n) * LANES + 15) / 16 * 16, \
                 at - ((n) * LANES + 15) / 16 * 16)
  a->h[0] = a->H;
  a->w[0] = a->W;
  for (int64_t l = 1; l <= L; ++l) {
    a->h[l] = (a->h[l - 1] + 1) / 2;
    a->w[l] = (a->w[l - 1] + 1) / 2;
  }
  const int64_t bwd = a->dx != NULL;
  const int64_t blocks = (a->C + LANES - 1) / LANES;
  a->off_a[0] = TAKE(a->cl ? 9 * blocks : (a->H + 2) * (a->W + 2));
  a->off_da[0] = TAKE(a->cl ? 0 : bwd * (a->H + 2) * (a->W + 2));
  a->off_rows = TAKE(3 * a->W);
  for (int64_t l = 1; l <= L; ++l) {
    const int64_t m = N * a->h[l] * a->w[l];
    const int64_t padded = l < L ? N * (a->h[l] + 2) * (a->w[l] + 2) : 0;
    a->off_z[l] = TAKE(m);
    a->off_dz[l] = TAKE(bwd * m);
    a->off_a[l] = TAKE(padded);
    a->off_da[l] = TAKE(bwd * padded);
  }
  const int64_t mL = N * a->h[L] * a->w[L];
  a->off_ctx = TAKE(mL);
  a->off_gate = TAKE(mL);
  a->off_gg = TAKE(mL);
  a->off_dctx = TAKE(mL);
  a->scratch = at;
#undef TAKE
}

/* A, B <- the per-lane scale and shift of a block's `active` channels:
 * sc[k], sh[k] (no sc: 1 and 0); 0 and 0 past them */
INLINE void lane_affine(const float *sc, const float *sh, int active, vf *A,
                        vf *B) {
  for (int k = 0; k < LANES; ++k) {
    (*A)[k] = k >= active ? 0.f : sc ? sc[k] : 1.f;
    (*B)[k] = k >= active || !sc ? 0.f : sh[k];
  }
}

/* dst row (W positions) <- A[k] * row p of plane (n, c0 + k) + B[k] for
 * the block's `active` channels. The other lanes read channel c0's row
 * (their A and B are 0: finite values stay 0 there, and no lane's value
 * reaches another lane or the outputs). Eight positions at a time through
 * an 8x8 transpose. */
INLINE void load_row(float *dst, const float *src, int64_t plane_stride,
                     int64_t W, int active, vf A, vf B) {
  const float *s[LANES];
  for (int k = 0; k < LANES; ++k)
    s[k] = src + (k < active ? k : 0) * plane_stride;
  int64_t q = 0;
  for (; q + LANES <= W; q += LANES) {
    vf r[LANES];
    for (int k = 0; k < LANES; ++k) memcpy(&r[k], s[k] + q, sizeof(vf));
    transpose8(r);
    for (int j = 0; j < LANES; ++j) V(dst + (q + j) * LANES) = r[j] * A + B;
  }
  for (; q < W; ++q) {
    const vf v = {s[0][q], s[1][q], s[2][q], s[3][q],
                  s[4][q], s[5][q], s[6][q], s[7][q]};
    V(dst + q * LANES) = v * A + B;
  }
}

/* row p of planes (n, c0 + k) <- src row, for the `active` channels */
INLINE void store_row(float *dst, const float *src, int64_t plane_stride,
                      int64_t W, int active) {
  if (active < LANES) {
    for (int k = 0; k < active; ++k)
      for (int64_t q = 0; q < W; ++q)
        dst[k * plane_stride + q] = src[q * LANES + k];
    return;
  }
  float *d[LANES];
  for (int k = 0; k < LANES; ++k) d[k] = dst + k * plane_stride;
  int64_t q = 0;
  for (; q + LANES <= W; q += LANES) {
    vf r[LANES];
    for (int j = 0; j < LANES; ++j) r[j] = V(src + (q + j) * LANES);
    transpose8(r);
    for (int k = 0; k < LANES; ++k) memcpy(d[k] + q, &r[k], sizeof(vf));
  }
  for (; q < W; ++q) {
    const vf v = V(src + q * LANES);
    for (int k = 0; k < LANES; ++k) d[k][q] = v[k];
  }
}

/* small (N, C, h, w) tensors (m = h * w cells; channels-last in memory,
 * (N, h, w, C), when cl) to and from a block's channels-last buffer */
INLINE int64_t small_at(int64_t n, int64_t C, int64_t c, int64_t m,
                        int64_t t, int cl) {
  return cl ? (n * m + t) * C + c : (n * C + c) * m + t;
}

INLINE void load_small(float *dst, const float *src, int64_t N, int64_t C,
                       int64_t c0, int64_t m, int active, int cl) {
  memset(dst, 0, sizeof(float) * N * m * LANES);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < m; ++t)
      for (int k = 0; k < active; ++k)
        dst[(n * m + t) * LANES + k] = src[small_at(n, C, c0 + k, m, t, cl)];
}

/* (stored a sample's planes at a time, or runs of the block's channels) */
INLINE void store_small(float *dst, const float *src, int64_t N, int64_t C,
                        int64_t c0, int64_t m, int active, int cl) {
  for (int64_t n = 0; n < N; ++n) {
    const float *s = src + n * m * LANES;
    if (!cl) {
      store_row(dst + (n * C + c0) * m, s, m, m, active);
      continue;
    }
    float *d = dst + n * m * C + c0;
    for (int64_t t = 0; t < m; ++t)
      memcpy(d + t * C, s + t * LANES, sizeof(float) * (size_t)active);
  }
}

/* a (C, ) or (C, 9) parameter's values for one block: lanes past the
 * block's channels, and all lanes without src, get `fill` */
INLINE void lanes_of(vf *dst, const float *src, int64_t c0,
                     int active, int64_t width, float fill) {
  for (int64_t t = 0; t < width; ++t) {
    dst[t] = splat(fill);
    if (src)
      for (int k = 0; k < active; ++k) dst[t][k] = src[(c0 + k) * width + t];
  }
}

/* P's interior (a padded map, H x W positions) <- y = A[k] * x + B[k] for
 * the block's `active` channels (planes src + k * plane_stride of H * W
 * contiguous values; the other lanes as in load_row). The planes are read
 * as flat arrays, eight positions per 8x8 transpose whatever W is: row by
 * row, the cells past each row's last multiple of eight take a scalar load
 * per channel, which is every cell of ResNet's 7x7 and 14x14 maps but 8
 * (load_input reads rows of a multiple of eight cells row by row).
 * With sums, the sums of y and y^2 of each lane are added to sums[0] and
 * sums[1]. */
INLINE void load_plane(float *P, const float *src, int64_t plane_stride,
                       int64_t H, int64_t W, int active, vf A, vf B,
                       vd *sums) {
  const float *s[LANES];
  for (int k = 0; k < LANES; ++k)
    s[k] = src + (k < active ? k : 0) * plane_stride;
  const int64_t HW = H * W, stride = (W + 2) * LANES;
  float *row = P + stride + LANES; /* the current row's first cell */
  int64_t q = 0;                   /* the next position's column */
  vf s1 = splat(0.f), s2 = splat(0.f);
  int64_t t = 0;
#define PUT(value)                          \
  do {                                      \
    const vf v_ = (value);                  \
    V(row + q * LANES) = v_;                \
    if (sums) {                             \
      s1 += v_;                             \
      s2 += v_ * v_;                        \
    }                                       \
    if (++q == W) {                         \
      q = 0;                                \
      row += stride;                        \
    }                                       \
  } while (0)
  for (; t + LANES <= HW; t += LANES) {
    vf r[LANES];
    for (int k = 0; k < LANES; ++k) memcpy(&r[k], s[k] + t, sizeof(vf));
    transpose8(r);
    for (int j = 0; j < LANES; ++j) PUT(r[j] * A + B);
    if (sums && (t + LANES) % CHUNK == 0) {
      sums[0] += widen(s1);
      sums[1] += widen(s2);
      s1 = s2 = splat(0.f);
    }
  }
  for (; t < HW; ++t) {
    const vf v = {s[0][t], s[1][t], s[2][t], s[3][t],
                  s[4][t], s[5][t], s[6][t], s[7][t]};
    PUT(v * A + B);
  }
#undef PUT
  if (sums) {
    sums[0] += widen(s1);
    sums[1] += widen(s2);
  }
}

/* The padded full-resolution map of y = A * x + B for one block and
 * sample; with G, also the gate's gradient of the sample:
 * gg += resize^T(grad * y); with sums, the sums of y and y^2 of each lane
 * are added to sums[0] and sums[1]. */
INLINE void load_input(const struct conv_gather_args *a, float *P, int64_t n,
                       int64_t c0, int active, vf A, vf B, float *G,
                       float *gg, vd *sums) {
  const int64_t H = a->H, W = a->W, HW = H * W;
  const int64_t stride = (W + 2) * LANES, wL = a->w[a->levels];
  const float *x = a->x + (n * a->C + c0) * HW;
  zero_border(P, H, W);
  if (W % LANES) {
    load_plane(P, x, HW, H, W, active, A, B, sums);
  } else {
    /* rows of whole transposes: row by row is faster */
    for (int64_t p = 0; p < H; ++p) {
      float *row = P + (p + 1) * stride + LANES;
      load_row(row, x + p * W, HW, W, active, A, B);
      if (!sums) continue;
      vf s1 = splat(0.f), s2 = splat(0.f);
      for (int64_t q = 0; q < W; ++q) {
        const vf v = V(row + q * LANES);
        s1 += v;
        s2 += v * v;
      }
      sums[0] += widen(s1);
      sums[1] += widen(s2);
    }
  }
  if (!G) return;
  vf one, zero;
  lane_affine(NULL, NULL, active, &one, &zero);
  for (int64_t p = 0; p < H; ++p) {
    const float *row = P + (p + 1) * stride + LANES;
    load_row(G, a->grad + (n * a->C + c0) * HW + p * W, HW, W, active, one,
             zero);
    float *o = gg + (n * a->h[a->levels] + a->row_index[p]) * wL * LANES;
    for (int64_t q = 0; q < W; ++q)
      V(o + a->col_index[q] * LANES) += V(G + q * LANES) * V(row + q * LANES);
  }
}

/* z (N maps of h1 x w1) <- s * z + u * (the sum of the taps of kernel K
 * that fall inside the H x W input at each position): the first level's
 * convolution of y = s * x' + u, from its convolution of x' (the zero
 * padding is padding of y, not of x') */
/* taps[r0][r2][q0][q2] <- u * the sum of the taps of kernel K inside the
 * input, per class of output row (its first input row inside? its last?)
 * and of column */
INLINE void level1_taps(const vf *K, vf u, vf taps[2][2][2][2]) {
  for (int r0 = 0; r0 < 2; ++r0)
    for (int r2 = 0; r2 < 2; ++r2)
      for (int q0 = 0; q0 < 2; ++q0)
        for (int q2 = 0; q2 < 2; ++q2) {
          vf t = splat(0.f);
          for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j)
              if ((i || r0) && (i < 2 || r2) && (j || q0) && (j < 2 || q2))
                t += K[3 * i + j];
          taps[r0][r2][q0][q2] = u * t;
        }
}

INLINE void level1_affine(float *z, const vf *K, vf s, vf u, int64_t N,
                          int64_t H, int64_t W, int64_t h1, int64_t w1) {
  vf taps[2][2][2][2];
  level1_taps(K, u, taps);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < h1; ++i) {
      const int r0 = i > 0, r2 = 2 * i + 1 < H;
      float *o = z + (n * h1 + i) * w1 * LANES;
      for (int64_t j = 0; j < w1; ++j)
        V(o + j * LANES) = s * V(o + j * LANES) +
                           taps[r0][r2][j > 0][2 * j + 1 < W];
    }
}

/* The sum over the input of the first level's convolution backward of d
 * (N maps of h1 x w1): each output cell's d times its kernel's taps inside
 * the H x W input */
INLINE vd level1_taps_dot(const float *d, const vf *K, int64_t N, int64_t H,
                          int64_t W, int64_t h1, int64_t w1) {
  vf taps[2][2][2][2];
  level1_taps(K, splat(1.f), taps);
  vd sum = {0};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < h1; ++i) {
      const int r0 = i > 0, r2 = 2 * i + 1 < H;
      const float *o = d + (n * h1 + i) * w1 * LANES;
      vf part = splat(0.f);
      for (int64_t j = 0; j < w1; ++j)
        part += V(o + j * LANES) * taps[r0][r2][j > 0][2 * j + 1 < W];
      sum += widen(part);
    }
  return sum;
}

/* sum of u * v over `cells` positions of LANES lanes each */
INLINE vd dot_cells(const float *u, const float *v, int64_t cells) {
  vd sum = {0};
  for (int64_t t0 = 0; t0 < cells; t0 += CHUNK) {
    vf part = splat(0.f);
    for (int64_t t = t0; t < min64(cells, t0 + CHUNK); ++t)
      part += V(u + t * LANES) * V(v + t * LANES);
    sum += widen(part);
  }
  return sum;
}

/* Channels-last: the full-resolution passes (cl_prepass_units before the
 * per-block chain, cl_postpass_units after it in backward) run over units
 * of whole rows (a sample's rows p0..p1, never splitting the rows of one
 * gate row: struct conv_gather_args' cl_rows), each unit on one thread for
 * all channel blocks, cell by cell: memory is read and written in runs of
 * all C channels. (Block by block, a block reads LANES floats per cell,
 * cells C floats apart; split over threads by blocks, the threads read
 * parts of the same cells: both several times slower.) Each unit writes
 * what belongs to its rows (level 1's output rows 2i in p0..p1, the gate
 * rows' sums, dx); sums over all rows are kept per unit and added up in
 * unit order afterwards, so that the results depend neither on the number
 * of threads nor on their timing. Both passes read x where it lies, with
 * no copy of its rows: level 1's stride-2 convolution takes its 3x3 taps
 * from rows 2i - 1 .. 2i + 1 (cl_conv_cell), and its backward gathers each
 * input position's gradient from the output positions whose taps cover it
 * (cl_gather_taps). The per-block chain (conv_gather_blocks) runs between
 * the passes, on what they keep per block (the cl_ fields). */

/* A block's buffers' stride, at least n floats, in whole cache lines; not
 * a multiple of 4 KB (64 lines), which would put a position of every block
 * in one L1 cache set: a pass over the blocks at one position (the gate's
 * sums S1, S2 of stage 2's 28 x 28 maps, 4 KB per block) would miss the
 * L1 cache at each */
static int64_t cl_pitch(int64_t n) {
  const int64_t lines = (n + 15) / 16;
  return (lines % 64 ? lines : lines + 1) * 16;
}

/* rows per unit, at least (then up to the next gate row) */
#define CL_BAND 8

/* the block's `active` channels at p (the other lanes 0), and back; a
 * part block through memory, so that a whole one keeps v in a register */
static __attribute__((noinline)) void copy_part(float *to, const float *from,
                                                int active) {
  for (int k = 0; k < active; ++k) to[k] = from[k];
}

INLINE vf load_lanes(const float *p, int active) {
  if (active == LANES) return load(p);
  float part[LANES] = {0};
  copy_part(part, p, active);
  return load(part);
}

INLINE void store_lanes(float *p, vf v, int active) {
  if (active == LANES) {
    store(p, v);
    return;
  }
  float part[LANES];
  store(part, v);
  copy_part(p, part, active);
}

INLINE int64_t cl_blocks(const struct conv_gather_args *a) {
  return (a->C + LANES - 1) / LANES;
}

/* unit u's sample n and rows p0..p1 (*p0, *p1) */
INLINE int64_t cl_unit(const struct conv_gather_args *a, int64_t u,
                       int64_t *p0, int64_t *p1) {
  *p0 = a->cl_rows[u % a->cl_units];
  *p1 = a->cl_rows[u % a->cl_units + 1] - 1;
  return u / a->cl_units;
}

/* Row p of sample n, position by position for every block, y = A x + B
 * read from x: gg (cl_gg) += resize^T(grad * y) (GG), or with the fused
 * norm's backward (y = x - mean) S1 += resize^T(grad) and
 * S2 += resize^T(grad * y) (cl_s) (S); with a fused training norm
 * (SUMS), each block's sums of y and y^2 in acc (two per block, in float
 * over the row), then added to part (a unit's, two per block, 9 apart) */
INLINE void cl_row_sums(const struct conv_gather_args *a, int64_t n,
                        int64_t p, vf *acc, vd *part, int GG, int S,
                        int SUMS) {
  const int64_t C = a->C, W = a->W, L = a->levels;
  const int64_t wL = a->w[L], mg = a->N * a->h[L] * wL * LANES;
  const int64_t blocks = cl_blocks(a);
  const int64_t at = (n * a->H + p) * W * C;
  const float *xrow = a->x + at, *grow = a->grad + at;
  const int64_t gate_at = (n * a->h[L] + a->row_index[p]) * wL;
  for (int64_t t = 0; SUMS && t < 2 * blocks; ++t) acc[t] = splat(0.f);
  for (int64_t q = 0; q < W; ++q) {
    const int64_t cell = (gate_at + a->col_index[q]) * LANES;
    for (int64_t b = 0; b < blocks; ++b) {
      const struct cl_block *st = a->clb + b;
      const int64_t c0 = b * LANES;
      const int active = (int)min64(LANES, C - c0);
      const vf y = load_lanes(xrow + q * C + c0, active) * st->A + st->B;
      if (GG || S) {
        const vf g = load_lanes(grow + q * C + c0, active);
        if (S) {
          float *s1 = a->cl_s + b * a->cl_ps + cell;
          V(s1) += g;
          V(s1 + mg) += g * y;
        } else {
          V(a->cl_gg + b * a->cl_pg + cell) += g * y;
        }
      }
      if (SUMS) {
        acc[2 * b] += y;
        acc[2 * b + 1] += y * y;
      }
    }
  }
  for (int64_t b = 0; SUMS && b < blocks; ++b) {
    part[9 * b] += widen(acc[2 * b]);
    part[9 * b + 1] += widen(acc[2 * b + 1]);
  }
}

/* Level 1's output at (i, j) (z: block 0's, block b's cl_pz floats on), every
 * block: the 3x3 stride-2 convolution of y = A x + B read straight from
 * x's rows r[0..2] = 2i - 1 .. 2i + 1 around column q = 2j; TOP, BOTTOM,
 * LEFT, RIGHT: whether the taps' outer rows and columns lie in the map
 * (else y is 0 there; constants where called) */
INLINE void cl_conv_cell(const struct conv_gather_args *a,
                         const float *const *r, int64_t q, float *z,
                         int TOP, int BOTTOM, int LEFT, int RIGHT) {
  const int64_t C = a->C, blocks = cl_blocks(a);
  for (int64_t b = 0; b < blocks; ++b) {
    const struct cl_block *st = a->clb + b;
    const int64_t c0 = b * LANES;
    const int active = (int)min64(LANES, C - c0);
    /* the taps in conv_forward's order (the same sums) */
    vf s = splat(0.f);
#pragma GCC unroll 3
    for (int ra = 0; ra < 3; ++ra) {
      if ((ra == 0 && !TOP) || (ra == 2 && !BOTTOM)) continue;
#pragma GCC unroll 3
      for (int cb = 0; cb < 3; ++cb) {
        if ((cb == 0 && !LEFT) || (cb == 2 && !RIGHT)) continue;
        const vf x = load_lanes(r[ra] + (q + cb - 1) * C + c0, active);
        s += st->K1[3 * ra + cb] * (x * st->A + st->B);
      }
    }
    V(z + b * a->cl_pz) = s;
  }
}

/* Level 1's output row i of sample n (cl_conv_cell along the row) */
INLINE void cl_conv_row(const struct conv_gather_args *a,
                        const float *const *r, float *z, int TOP,
                        int BOTTOM) {
  const int64_t W = a->W, w1 = a->w[1];
  for (int64_t j = 0; j < w1; ++j) {
    float *zj = z + j * LANES;
    const int left = j > 0, right = 2 * j + 1 < W;
    if (left && right)
      cl_conv_cell(a, r, 2 * j, zj, TOP, BOTTOM, 1, 1);
    else if (left)
      cl_conv_cell(a, r, 2 * j, zj, TOP, BOTTOM, 1, 0);
    else if (right)
      cl_conv_cell(a, r, 2 * j, zj, TOP, BOTTOM, 0, 1);
    else
      cl_conv_cell(a, r, 2 * j, zj, TOP, BOTTOM, 0, 0);
  }
}

/* Before the chain, units [first, last): cl_row_sums of the unit's rows
 * and level 1's convolution (into cl_z) of its output rows i (2i in
 * p0..p1), each after the sums of the rows it reads that are the unit's.
 * What they read per block (cl_init): y = A * x + B with A, B the affine
 * given; with a fused training norm y' = x - pivot (A = 1, B = -pivot, as
 * conv_gather_blocks' NCHW pass: its sums stay exact where x sits far
 * from 0); with the fused norm's statistics x' = x - mean (then cl_z holds
 * z', level 1 of x'), from which the chain makes y's level 1, gg and the
 * norm backward's sums at low resolution, so that the second pass writes
 * the norm's input gradient at once. */
CLONED static void cl_prepass_units(const void *args_, int64_t first,
                                    int64_t last, float *buf) {
  const struct conv_gather_args *a = (const struct conv_gather_args *)args_;
  const int64_t H = a->H, W = a->W, C = a->C, h1 = a->h[1], w1 = a->w[1];
  const int64_t blocks = cl_blocks(a);
  const int S = a->norm_invstd != NULL;
  const int GG = !S && (a->grad_gate != NULL || (a->dx && !a->dcontext));
  const int SUMS = a->norm_batch;
  vf *acc = (vf *)(buf + a->off_a[0]);
  for (int64_t u = first; u < last; ++u) {
    int64_t p0, p1;
    const int64_t n = cl_unit(a, u, &p0, &p1);
    vd *part = a->cl_part + u * blocks * 9;
    for (int64_t b = 0; b < blocks; ++b)
      part[9 * b] = part[9 * b + 1] = (vd){0};
    int64_t p = p0;
    for (int64_t i = (p0 + 1) / 2; i <= p1 / 2 + 1; ++i) {
      /* the sums of the unit's rows up to 2i + 1, then output row i */
      for (; p <= min64(p1, 2 * i + 1); ++p) {
        if (S && SUMS) cl_row_sums(a, n, p, acc, part, 0, 1, 1);
        else if (S) cl_row_sums(a, n, p, acc, part, 0, 1, 0);
        else if (GG && SUMS) cl_row_sums(a, n, p, acc, part, 1, 0, 1);
        else if (GG) cl_row_sums(a, n, p, acc, part, 1, 0, 0);
        else if (SUMS) cl_row_sums(a, n, p, acc, part, 0, 0, 1);
      }
      if (2 * i > p1) break;
      const float *x = a->x + n * H * W * C;
      const int top = i > 0, bottom = 2 * i + 1 < H;
      const float *r[3] = {x + (2 * i - top) * W * C, x + 2 * i * W * C,
                           x + (2 * i + bottom) * W * C};
      float *z = a->cl_z + (n * h1 + i) * w1 * LANES;
      if (top && bottom) cl_conv_row(a, r, z, 1, 1);
      else if (top) cl_conv_row(a, r, z, 1, 0);
      else if (bottom) cl_conv_row(a, r, z, 0, 1);
      else cl_conv_row(a, r, z, 0, 0);
    }
  }
}

/* Level 1's convolution backward at one input position, gathered: the
 * output positions whose taps cover input row p are (i, a) with
 * p = 2i + a - 1 (p even: (p/2, 1); p odd: ((p-1)/2, 2) and, inside the
 * map, ((p+1)/2, 0)), and the same for the columns; rows, cols of them
 * (1 or 2; compile-time constants where called). dz[r] points at row
 * ri[r] of the output gradient, taps[r][c] = 3 a_r + b_c, at[c] the
 * column's offset. Returns the input gradient sum_t K[t] dz(t) and adds
 * dz(t) * y to the tap's sum acc[t]. */
INLINE vf cl_gather_taps(const float *const *dz, const int64_t *at,
                         const int taps[2][2], int rows, int cols,
                         const vf *K, vf y, vf *acc) {
  vf dy = splat(0.f);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const int t = taps[r][c];
      const vf g = V(dz[r] + at[c]);
      dy += K[t] * g;
      acc[t] += g * y;
    }
  return dy;
}

/* dx at position (p, q) of sample n, every block: grad * resize(gate)
 * (grow NULL: none) + level 1's input gradient (cl_gather_taps; its kernels' terms into acc,
 * 9 per block); with the fused norm, through its backward (its mean terms
 * md, mdx known) */
INLINE void cl_input_grad_cell(const struct conv_gather_args *a,
                               const float *grow, const float *xrow,
                               float *orow, int64_t q, int64_t cell,
                               const float *const *dz, const int64_t *at,
                               const int taps[2][2], int rows, int cols,
                               vf *acc) {
  const int64_t C = a->C, blocks = cl_blocks(a);
  const int fuse = a->norm_invstd != NULL, train = fuse && a->norm_train;
  for (int64_t b = 0; b < blocks; ++b) {
    const struct cl_block *st = a->clb + b;
    const int64_t c0 = b * LANES;
    const int active = (int)min64(LANES, C - c0);
    const float *dzb[2] = {dz[0] + b * a->cl_pz, dz[1] + b * a->cl_pz};
    const vf xv = load_lanes(xrow + q * C + c0, active);
    vf d = cl_gather_taps(dzb, at, taps, rows, cols, st->K1,
                          xv * st->A + st->B, acc + 9 * b);
    if (grow)
      d += load_lanes(grow + q * C + c0, active) *
           V(a->cl_gate + b * a->cl_pg + cell);
    if (train)
      d = st->A * (d - st->md - (xv - st->nmean) * st->ninvstd * st->mdx);
    else if (fuse)
      d *= st->A;
    store_lanes(orow + q * C + c0, d, active);
  }
}

/* After the chain (backward), units [first, last): dx of the unit's rows
 * p0..p1, position by position for all blocks, level 1's convolution
 * backward gathered at each input position from the output gradient
 * (cl_z), with no rows of y kept; its kernels' gradient, per unit, from
 * the terms of the unit's input rows (summed in float over a row, then
 * added to the unit's sums) */
CLONED static void cl_postpass_units(const void *args_, int64_t first,
                                     int64_t last, float *buf) {
  const struct conv_gather_args *a = (const struct conv_gather_args *)args_;
  const int64_t C = a->C, H = a->H, W = a->W, L = a->levels;
  const int64_t h1 = a->h[1], w1 = a->w[1], wL = a->w[L];
  const int64_t blocks = cl_blocks(a);
  vf *acc = (vf *)(buf + a->off_a[0]);
  for (int64_t u = first; u < last; ++u) {
    int64_t p0, p1;
    const int64_t n = cl_unit(a, u, &p0, &p1);
    vd *part = a->cl_part + u * blocks * 9;
    for (int64_t t = 0; t < blocks * 9; ++t) part[t] = (vd){0};
    for (int64_t p = p0; p <= p1; ++p) {
      /* the output rows (and their taps' rows a) covering row p: p / 2
       * (tap row 1) when p is even */
      int64_t ri[2] = {p / 2, p / 2};
      int ra[2] = {1, 1}, rows = 1;
      if (p % 2) {
        ri[0] = (p - 1) / 2;
        ra[0] = 2;
        ri[1] = (p + 1) / 2;
        ra[1] = 0;
        rows = ri[1] < h1 ? 2 : 1;
      }
      const float *dz[2] = {
          a->cl_z + (n * h1 + ri[0]) * w1 * LANES,
          a->cl_z + (n * h1 + ri[rows - 1]) * w1 * LANES};
      for (int64_t t = 0; t < blocks * 9; ++t) acc[t] = splat(0.f);
      const int64_t row_at = (n * H + p) * W * C;
      const float *grow = a->grad ? a->grad + row_at : NULL;
      const float *xrow = a->x + row_at;
      float *orow = a->dx + row_at;
      const int64_t gate_at = (n * a->h[L] + a->row_index[p]) * wL;
      for (int64_t q = 0; q < W; ++q) {
        const int64_t cell = (gate_at + a->col_index[q]) * LANES;
        int64_t at[2];
        int taps[2][2], cols = 1;
        if (q % 2 == 0) {
          at[0] = q / 2 * LANES;
          for (int r = 0; r < 2; ++r) taps[r][0] = 3 * ra[r] + 1;
        } else {
          at[0] = (q - 1) / 2 * LANES;
          at[1] = (q + 1) / 2 * LANES;
          cols = (q + 1) / 2 < w1 ? 2 : 1;
          for (int r = 0; r < 2; ++r) {
            taps[r][0] = 3 * ra[r] + 2;
            taps[r][1] = 3 * ra[r];
          }
        }
        /* constant counts, so that each case's loop unrolls */
        if (rows == 1 && cols == 1)
          cl_input_grad_cell(a, grow, xrow, orow, q, cell, dz, at, taps, 1,
                             1, acc);
        else if (rows == 1)
          cl_input_grad_cell(a, grow, xrow, orow, q, cell, dz, at, taps, 1,
                             2, acc);
        else if (cols == 1)
          cl_input_grad_cell(a, grow, xrow, orow, q, cell, dz, at, taps, 2,
                             1, acc);
        else
          cl_input_grad_cell(a, grow, xrow, orow, q, cell, dz, at, taps, 2,
                             2, acc);
      }
      for (int64_t t = 0; t < blocks * 9; ++t) part[t] += widen(acc[t]);
    }
  }
}

/* block b's sum of term t over the units, in unit order */
static vd cl_sum(const struct conv_gather_args *a, int64_t b, int t) {
  const int64_t blocks = cl_blocks(a), units = a->N * a->cl_units;
  vd sum = {0};
  for (int64_t u = 0; u < units; ++u)
    sum += a->cl_part[(u * blocks + b) * 9 + t];
  return sum;
}

/* each block's level 1 kernels and the affine the first pass reads (see
 * cl_prepass_units), the fused norm's statistics, and zeroed sums */
static void cl_init(const struct conv_gather_args *a) {
  const int64_t C = a->C, L = a->levels;
  const int64_t mg = a->N * a->h[L] * a->w[L] * LANES;
  const int need_gg = a->grad_gate != NULL || (a->dx && !a->dcontext);
  for (int64_t b = 0; b < cl_blocks(a); ++b) {
    struct cl_block *st = a->clb + b;
    const int64_t c0 = b * LANES;
    const int active = (int)min64(LANES, C - c0);
    vf zero;
    lanes_of(st->K1, a->weight[0], c0, active, 9, 0.f);
    st->nmean = splat(0.f);
    st->ninvstd = splat(1.f);
    if (a->norm_invstd) {
      lanes_of(&st->nmean, a->norm_mean_in, c0, active, 1, 0.f);
      lanes_of(&st->ninvstd, a->norm_invstd, c0, active, 1, 1.f);
      lane_affine(NULL, NULL, active, &st->A, &zero);
      st->B = -st->nmean;
      memset(a->cl_s + b * a->cl_ps, 0, sizeof(float) * 2 * mg);
    } else if (a->norm_batch) {
      vf pivot = splat(0.f);
      for (int k = 0; k < active; ++k) pivot[k] = a->x[c0 + k];
      lane_affine(NULL, NULL, active, &st->A, &zero);
      st->B = -pivot;
    } else {
      lane_affine(a->scale ? a->scale + c0 : NULL,
                  a->scale ? a->shift + c0 : NULL, active, &st->A, &st->B);
    }
    if (need_gg && !a->norm_invstd)
      memset(a->cl_gg + b * a->cl_pg, 0, sizeof(float) * mg);
  }
}

CLONED static void conv_gather_blocks(const void *args_, int64_t first,
                               int64_t last, float *buf) {
  const struct conv_gather_args *a = (const struct conv_gather_args *)args_;
  const int64_t N = a->N, C = a->C, H = a->H, W = a->W, L = a->levels;
  const int64_t hL = a->h[L], wL = a->w[L], mL = hL * wL;
  const int64_t stride = (W + 2) * LANES;
  const int backward = a->dx != NULL;
  const int need_gg = a->grad_gate != NULL || (backward && !a->dcontext);
  float *P = buf + a->off_a[0], *dP = buf + a->off_da[0];
  float *G = buf + a->off_rows, *D = G + W * LANES, *X = D + W * LANES;
  float *ctx = buf + a->off_ctx, *gate = buf + a->off_gate;
  float *gg = buf + a->off_gg, *dctx = buf + a->off_dctx;
  const int64_t mg = N * mL * LANES;
  for (int64_t block = first; block < last; ++block) {
    const int64_t c0 = block * LANES;
    const int active = (int)min64(LANES, C - c0);
    vf K[MAX_LEVELS + 1][9], gamma[MAX_LEVELS + 1], beta[MAX_LEVELS + 1];
    vf mean[MAX_LEVELS + 1], invstd[MAX_LEVELS + 1];
    vf bsc[MAX_LEVELS + 1], bsh[MAX_LEVELS + 1];
    vd dK[MAX_LEVELS + 1][9];
    for (int64_t l = 1; l <= L; ++l) {
      lanes_of(K[l], a->weight[l - 1], c0, active, 9, 0.f);
      lanes_of(&gamma[l], a->gamma[l - 1], c0, active, 1, 1.f);
      lanes_of(&beta[l], a->beta[l - 1], c0, active, 1, 0.f);
      /* the running statistics (placeholders where the level trains),
       * invstd in float as ATen's batch norm computes it */
      lanes_of(&mean[l], a->rmean[l - 1], c0, active, 1, 0.f);
      invstd[l] = splat(1.f);
      if (a->rvar[l - 1])
        for (int k = 0; k < active; ++k)
          invstd[l][k] =
              1.f / sqrtf(a->rvar[l - 1][c0 + k] + (float)a->eps[l - 1]);
      for (int t = 0; t < 9; ++t) dK[l][t] = (vd){0};
    }

    /* y = A * x + B; one and zero: the lanes' 1 and 0 */
    vf A, B, one, zero;
    lane_affine(a->scale ? a->scale + c0 : NULL,
                a->scale ? a->shift + c0 : NULL, active, &A, &B);
    lane_affine(NULL, NULL, active, &one, &zero);

    /* level 1's convolution, sample by sample, and the gate's gradient */
    const int64_t m1 = N * a->h[1] * a->w[1] * LANES;
    float *z1 = buf + a->off_z[1];
    if (need_gg) memset(gg, 0, sizeof(float) * N * mL * LANES);
    if (a->level1_in && !(a->cl && a->norm_invstd)) {
      memcpy(z1, a->level1_in + block * m1, sizeof(float) * m1);
    } else if (a->norm_batch) {
      /* the norm's statistics and level 1 from one pass over x' = x - the
       * channel's first value (its sums stay exact where x sits far from
       * 0), then level 1 of y = s * x' + u */
      vf pivot = splat(0.f), gamma_n, beta_n;
      /* channels-last: as cl_init */
      for (int k = 0; k < active; ++k)
        pivot[k] = a->x[a->cl ? c0 + k : (c0 + k) * H * W];
      vd sums[2] = {{0}, {0}};
      if (a->cl) {
        memcpy(z1, a->cl_z + block * a->cl_pz, sizeof(float) * m1);
        sums[0] = a->clb[block].sums[0];
        sums[1] = a->clb[block].sums[1];
      } else {
        for (int64_t n = 0; n < N; ++n) {
          load_input(a, P, n, c0, active, one, -pivot, NULL, NULL, sums);
          conv_forward(P, W, K[1], z1 + n * a->h[1] * a->w[1] * LANES,
                       a->h[1], a->w[1]);
        }
      }
      const vd d = sums[0] / (double)(N * H * W);
      const vd var = sums[1] / (double)(N * H * W) - d * d;
      vf invstd_n = splat(1.f);
      for (int k = 0; k < LANES; ++k)
        invstd_n[k] =
            (float)(1.0 / sqrt((var[k] > 0 ? var[k] : 0) + a->norm_eps));
      if (a->norm_gamma) lanes_of(&gamma_n, a->norm_gamma, c0, active, 1, 1.f);
      else gamma_n = splat(1.f);
      if (a->norm_beta) lanes_of(&beta_n, a->norm_beta, c0, active, 1, 0.f);
      else beta_n = splat(0.f);
      const vf s = gamma_n * invstd_n;
      for (int k = 0; k < active; ++k) {
        a->norm_mean[c0 + k] = (float)(pivot[k] + d[k]);
        a->norm_var[c0 + k] = (float)(var[k] > 0 ? var[k] : 0);
      }
      level1_affine(z1, K[1], s, beta_n - __builtin_convertvector(d, vf) * s,
                    N, H, W, a->h[1], a->w[1]);
      /* y = A * x + B for the excite: B = beta - mean * s */
      A = s;
      for (int k = 0; k < LANES; ++k)
        B[k] = k < active ? beta_n[k] - a->norm_mean[c0 + k] * s[k] : 0.f;
    } else if (a->cl && a->norm_invstd) {
      /* level 1 of y = A * x' + (A * mean + B) from that of x' = x - mean,
       * and gg = A * S2 + (A * mean + B) * S1 (cl_prepass) */
      const struct cl_block *st = a->clb + block;
      const vf Bm = A * st->nmean + B;
      if (!a->gg_only) {
        memcpy(z1, a->cl_z + block * a->cl_pz, sizeof(float) * m1);
        level1_affine(z1, K[1], A, Bm, N, H, W, a->h[1], a->w[1]);
      }
      const float *S1 = a->cl_s + block * a->cl_ps, *S2 = S1 + mg;
      if (need_gg)
        for (int64_t t = 0; t < N * mL; ++t)
          V(gg + t * LANES) = A * V(S2 + t * LANES) + Bm * V(S1 + t * LANES);
    } else if (a->cl) {
      memcpy(z1, a->cl_z + block * a->cl_pz, sizeof(float) * m1);
      if (need_gg) memcpy(gg, a->cl_gg + block * a->cl_pg, sizeof(float) * mg);
    } else {
      for (int64_t n = 0; n < N; ++n) {
        load_input(a, P, n, c0, active, A, B, need_gg ? G : NULL, gg, NULL);
        conv_forward(P, W, K[1], z1 + n * a->h[1] * a->w[1] * LANES,
                     a->h[1], a->w[1]);
      }
    }
    if (a->level1_out && a->cl && a->norm_invstd) {
      /* channels-last with the norm's statistics: what the first pass
       * made, z', S1 and S2, for a second call to take instead of its
       * first pass */
      memcpy(a->level1_out + block * (m1 + 2 * mg), a->cl_z + block * a->cl_pz,
             sizeof(float) * m1);
      memcpy(a->level1_out + block * (m1 + 2 * mg) + m1,
             a->cl_s + block * a->cl_ps, sizeof(float) * 2 * mg);
    } else if (a->level1_out) {
      memcpy(a->level1_out + block * m1, buf + a->off_z[1],
             sizeof(float) * m1);
    }
    if (a->gg_only) {
      store_small(a->grad_gate, gg, N, C, c0, mL, active, a->small_cl);
      continue;
    }

    /* the chain: norm, activation, next convolution */
    for (int64_t l = 1; l <= L; ++l) {
      const int64_t hl = a->h[l], wl = a->w[l], ml = hl * wl, m = N * ml;
      const float *z = buf + a->off_z[l];
      if (a->raw && a->raw[l - 1])
        store_small(a->raw[l - 1], z, N, C, c0, ml, active, a->cl);
      if (a->train[l - 1]) {
        vd s = {0}, s2 = {0};
        for (int64_t t0 = 0; t0 < m; t0 += CHUNK) {
          vf part = splat(0.f);
          for (int64_t t = t0; t < min64(m, t0 + CHUNK); ++t)
            part += V(z + t * LANES);
          s += widen(part);
        }
        const vd mu = s / (double)m;
        const vf muf = __builtin_convertvector(mu, vf);
        for (int64_t t0 = 0; t0 < m; t0 += CHUNK) {
          vf part = splat(0.f);
          for (int64_t t = t0; t < min64(m, t0 + CHUNK); ++t) {
            const vf d = V(z + t * LANES) - muf;
            part += d * d;
          }
          s2 += widen(part);
        }
        const vd v = s2 / (double)m;
        for (int k = 0; k < LANES; ++k) {
          mean[l][k] = (float)mu[k];
          invstd[l][k] = (float)(1.0 / sqrt(v[k] + a->eps[l - 1]));
        }
        if (a->mean)
          for (int k = 0; k < active; ++k) {
            a->mean[(l - 1) * C + c0 + k] = (float)mu[k];
            a->var[(l - 1) * C + c0 + k] = (float)v[k];
          }
        if (a->run_mean && a->run_mean[l - 1]) {
          const double w = a->run_momentum[l - 1];
          const double unbiased = (double)m / (double)(m - 1);
          float *rm = a->run_mean[l - 1] + c0, *rv = a->run_var[l - 1] + c0;
          for (int k = 0; k < active; ++k) {
            rm[k] = (float)(w * mu[k] + (1. - w) * rm[k]);
            rv[k] = (float)(w * v[k] * unbiased + (1. - w) * rv[k]);
          }
        }
      }
      bsc[l] = gamma[l] * invstd[l];
      bsh[l] = beta[l] - mean[l] * bsc[l];
      const int relu = a->relu[l - 1];
      if (l < L) {
        const int64_t hn = a->h[l + 1], wn = a->w[l + 1];
        const int64_t padded = (hl + 2) * (wl + 2) * LANES;
        for (int64_t n = 0; n < N; ++n) {
          float *A = buf + a->off_a[l] + n * padded;
          zero_border(A, hl, wl);
          for (int64_t i = 0; i < hl; ++i)
            for (int64_t j = 0; j < wl; ++j) {
              const vf v = bsc[l] * V(z + ((n * hl + i) * wl + j) * LANES) +
                           bsh[l];
              V(A + ((i + 1) * (wl + 2) + j + 1) * LANES) =
                  relu ? where_positive(v, v) : v;
            }
          conv_forward(A, wl, K[l + 1],
                       buf + a->off_z[l + 1] + n * hn * wn * LANES, hn, wn);
        }
      } else {
        for (int64_t t = 0; t < m; ++t) {
          const vf v = bsc[l] * V(z + t * LANES) + bsh[l];
          V(ctx + t * LANES) = relu ? where_positive(v, v) : v;
        }
      }
    }
    if (a->context)
      store_small(a->context, ctx, N, C, c0, mL, active, a->small_cl);
    if (a->grad_gate)
      store_small(a->grad_gate, gg, N, C, c0, mL, active, a->small_cl);
    if (a->excite) {
      /* the caller excites after every block: GE-theta-plus's MLP mixes
       * channels, and one pass over whole tensors streams faster than a
       * block's planes (N runs of LANES planes) */
      if (!a->excite->mlp_w1)
        for (int64_t t = 0; t < N * mL; ++t)
          V(ctx + t * LANES) = sigmoid(V(ctx + t * LANES));
      store_small(a->ctx_rows, ctx, N, C, c0, mL, active, 1);
      for (int k = 0; k < active; ++k) {
        a->affine[c0 + k] = A[k];
        a->affine[C + c0 + k] = B[k];
      }
    }
    if (!backward) continue;

    /* the gate and the context's gradient */
    if (a->dcontext) {
      if (a->gate) load_small(gate, a->gate, N, C, c0, mL, active, a->small_cl);
      load_small(dctx, a->dcontext, N, C, c0, mL, active, a->small_cl);
    } else {
      for (int64_t t = 0; t < N * mL; ++t) {
        const vf g = sigmoid(V(ctx + t * LANES));
        V(gate + t * LANES) = g;
        V(dctx + t * LANES) = V(gg + t * LANES) * g * (1.f - g);
      }
    }

    /* the chain backwards: activation, norm, convolution (level 1's
     * convolution is left to the full-resolution pass) */
    for (int64_t l = L; l >= 1; --l) {
      const int64_t hl = a->h[l], wl = a->w[l], ml = hl * wl, m = N * ml;
      const float *z = buf + a->off_z[l];
      float *d = buf + a->off_dz[l];
      if (l == L) {
        memcpy(d, dctx, sizeof(float) * m * LANES);
      } else {
        const float *dA = buf + a->off_da[l];
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < hl; ++i)
            memcpy(d + (n * ml + i * wl) * LANES,
                   dA + ((n * (hl + 2) + i + 1) * (wl + 2) + 1) * LANES,
                   sizeof(float) * wl * LANES);
      }
      if (a->relu[l - 1])
        for (int64_t t = 0; t < m; ++t)
          V(d + t * LANES) =
              where_positive(bsc[l] * V(z + t * LANES) + bsh[l],
                             V(d + t * LANES));
      vd sd = {0}, sdx = {0};
      for (int64_t t0 = 0; t0 < m; t0 += CHUNK) {
        vf part = splat(0.f), partx = splat(0.f);
        for (int64_t t = t0; t < min64(m, t0 + CHUNK); ++t) {
          const vf dt = V(d + t * LANES);
          part += dt;
          partx += dt * ((V(z + t * LANES) - mean[l]) * invstd[l]);
        }
        sd += widen(part);
        sdx += widen(partx);
      }
      if (a->dgamma)
        for (int k = 0; k < active; ++k) {
          a->dgamma[(l - 1) * C + c0 + k] = (float)sdx[k];
          a->dbeta[(l - 1) * C + c0 + k] = (float)sd[k];
        }
      if (a->train[l - 1]) {
        const vf md = __builtin_convertvector(sd / (double)m, vf);
        const vf mdx = __builtin_convertvector(sdx / (double)m, vf);
        for (int64_t t = 0; t < m; ++t) {
          const vf xhat = (V(z + t * LANES) - mean[l]) * invstd[l];
          V(d + t * LANES) = bsc[l] * (V(d + t * LANES) - md - xhat * mdx);
        }
      } else {
        for (int64_t t = 0; t < m; ++t) V(d + t * LANES) *= bsc[l];
      }
      if (l == 1) break;
      const int64_t hp = a->h[l - 1], wp = a->w[l - 1];
      const int64_t padded = (hp + 2) * (wp + 2) * LANES;
      memset(buf + a->off_da[l - 1], 0, sizeof(float) * N * padded);
      for (int64_t n = 0; n < N; ++n)
        conv_backward(buf + a->off_a[l - 1] + n * padded,
                      buf + a->off_da[l - 1] + n * padded, wp, K[l],
                      d + n * ml * LANES, hl, wl, dK[l]);
    }

    if (a->cl) {
      /* the full-resolution pass streams rows over the thread's blocks
       * (cl_postpass): what it needs of this block */
      struct cl_block *st = a->clb + block;
      const float *dz1 = buf + a->off_dz[1];
      if (a->norm_invstd) {
        /* the norm backward's sums, at low resolution: over the input,
         * dy = grad * resize(gate) + level 1's backward of dz1 sums to
         * gate . S1 + dz1 . taps, and dy * (x - mean) to gate . S2 +
         * dz1 . z' (cl_prepass) */
        const float *S1 = a->cl_s + block * a->cl_ps, *S2 = S1 + mg;
        st->nsum = dot_cells(gate, S1, N * mL) +
                   level1_taps_dot(dz1, K[1], N, H, W, a->h[1], a->w[1]);
        st->nsumx = (dot_cells(gate, S2, N * mL) +
                     dot_cells(dz1, a->cl_z + block * a->cl_pz,
                               N * a->h[1] * a->w[1])) *
                    widen(st->ninvstd);
      }
      memcpy(a->cl_z + block * a->cl_pz, dz1, sizeof(float) * m1);
      if (a->grad)
        memcpy(a->cl_gate + block * a->cl_pg, gate, sizeof(float) * mg);
      /* y's affine for the second pass (cl_init's may be x - mean's) */
      st->A = A;
      st->B = B;
      for (int64_t l = 2; l <= L; ++l)
        for (int k = 0; k < active; ++k)
          for (int t = 0; t < 9; ++t)
            a->dweight[((l - 1) * C + c0 + k) * 9 + t] = (float)dK[l][t][k];
      continue;
    }

    /* full resolution, sample by sample (the block's planes are still in
     * the cache): level 1's convolution backward, then
     * dy = grad * resize(gate) + its input gradient, written to dx; with
     * the norm, also its sums of dy and dy * xhat (xhat = (x - mean) *
     * invstd) */
    const float *dz1 = buf + a->off_dz[1];
    const int64_t HW = H * W;
    const int fuse = a->norm_invstd != NULL;
    vf nmean = splat(0.f), ninvstd = splat(1.f);
    if (fuse) {
      lanes_of(&nmean, a->norm_mean_in, c0, active, 1, 0.f);
      lanes_of(&ninvstd, a->norm_invstd, c0, active, 1, 1.f);
    }
    vd nsum = {0}, nsumx = {0};
    for (int64_t n = 0; n < N; ++n) {
      load_input(a, P, n, c0, active, A, B, NULL, NULL, NULL);
      memset(dP, 0, sizeof(float) * (H + 2) * stride);
      conv_backward(P, dP, W, K[1], dz1 + n * a->h[1] * a->w[1] * LANES,
                    a->h[1], a->w[1], dK[1]);
      float *out = a->dx + (n * C + c0) * HW;
      for (int64_t p = 0; p < H; ++p) {
        const float *gr = gate + (n * hL + a->row_index[p]) * wL * LANES;
        const float *dr = dP + (p + 1) * stride + LANES;
        if (a->grad) {
          load_row(G, a->grad + (n * C + c0) * HW + p * W, HW, W, active,
                   one, zero);
          for (int64_t q = 0; q < W; ++q)
            V(D + q * LANES) = V(G + q * LANES) *
                                   V(gr + a->col_index[q] * LANES) +
                               V(dr + q * LANES);
        } else {
          memcpy(D, dr, sizeof(float) * W * LANES);
        }
        if (fuse) {
          const float *xr = a->x + (n * C + c0) * HW + p * W;
          load_row(X, xr, HW, W, active, one, -nmean * one);  /* x - mean */
          vf s = splat(0.f), sx = splat(0.f);
          for (int64_t q = 0; q < W; ++q) {
            const vf d = V(D + q * LANES);
            s += d;
            sx += d * V(X + q * LANES);
          }
          nsum += widen(s);
          nsumx += widen(sx) * widen(ninvstd);
        }
        store_row(out + p * W, D, HW, W, active);
      }
    }
    if (fuse) {
      /* dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)) with the
       * batch's statistics, else scale * dy; over the block's planes, in
       * the cache */
      const double m = (double)(N * HW);
      for (int k = 0; k < active; ++k) {
        a->norm_dgamma[c0 + k] = (float)nsumx[k];
        a->norm_dbeta[c0 + k] = (float)nsum[k];
        const float sk = A[k], mk = nmean[k], ik = ninvstd[k];
        const float md = a->norm_train ? (float)(nsum[k] / m) : 0.f;
        const float mdx = a->norm_train ? (float)(nsumx[k] / m) : 0.f;
        for (int64_t n = 0; n < N; ++n) {
          float *out = a->dx + (n * C + c0 + k) * HW;
          const float *xin = a->x + (n * C + c0 + k) * HW;
          if (a->norm_train)
            for (int64_t i = 0; i < HW; ++i)
              out[i] = sk * (out[i] - md - (xin[i] - mk) * ik * mdx);
          else
            for (int64_t i = 0; i < HW; ++i) out[i] *= sk;
        }
      }
    }
    for (int64_t l = 1; l <= L; ++l)
      for (int k = 0; k < active; ++k)
        for (int t = 0; t < 9; ++t)
          a->dweight[((l - 1) * C + c0 + k) * 9 + t] = (float)dK[l][t][k];
  }
}

/* GE-theta-plus's backward, the blocks' part: the chain forward to the
 * context and the gate's gradient (as rows, (N * hL * wL, C)), or given
 * the forward's context (mlp_context) the gate's gradient alone, then the
 * MLP's backward over all channels (ge_mlp_backward: the gate, the
 * context's gradient and its parameters'), then the blocks again from
 * level 1 on (channels-last: from the first pass's buffers; else from a
 * copy of level 1 made the first time) with that gate and gradient.
 * Returns 0, or 1 when out of memory. */
static int mlp_backward_blocks(struct conv_gather_args *a,
                               const struct ge_excite_spec *mlp,
                               int threads) {
  const int64_t N = a->N, C = a->C, L = a->levels;
  const int64_t rows = N * a->h[L] * a->w[L], blocks = (C + LANES - 1) / LANES;
  const int64_t m1 = a->cl ? 0 : N * a->h[1] * a->w[1] * LANES;
  const int64_t plane = N * a->H * a->W * LANES;
  float *buf = (float *)malloc(sizeof(float) *
                               (size_t)(4 * rows * C + blocks * m1));
  if (!buf) return 1;
  float *ctx = buf, *gg = ctx + rows * C, *gate = gg + rows * C;
  float *dctx = gate + rows * C, *level1 = dctx + rows * C;
  float *dx = a->dx;
  const int small_cl = a->small_cl;
  a->small_cl = 1;
  a->dx = NULL;
  a->context = mlp->mlp_context ? NULL : ctx;
  a->gg_only = mlp->mlp_context != NULL;
  a->grad_gate = gg;
  a->level1_out = m1 ? level1 : NULL;
  int status = for_planes(conv_gather_blocks, a, blocks, plane, a->scratch,
                          threads);
  a->gg_only = 0;
  if (!status)
    status = ge_mlp_backward(mlp->mlp_context ? mlp->mlp_context : ctx, gg,
                             rows, C, mlp->mlp_hidden, mlp->mlp_w1,
                             mlp->mlp_b1, mlp->mlp_w2, mlp->mlp_b2,
                             mlp->mlp_relu, gate, dctx, mlp->mlp_dw1,
                             mlp->mlp_db1, mlp->mlp_dw2, mlp->mlp_db2,
                             threads);
  a->dx = dx;
  a->context = a->grad_gate = a->level1_out = NULL;
  a->level1_in = m1 ? level1 : NULL;
  a->gate = gate;
  a->dcontext = dctx;
  if (!status)
    status = for_planes(conv_gather_blocks, a, blocks, plane, a->scratch,
                        threads);
  a->small_cl = small_cl;
  a->gate = a->dcontext = a->level1_in = NULL;
  free(buf);
  return status;
}

/* The gather (and with dx its backward) of the channels of x; with
 * excite, the excite of its output too. Returns 0, 1 when memory could not
 * be allocated, 2 for more than MAX_LEVELS levels, 3 for level1_in with an
 * output that needs the input's gate gradient, 4 for a fused norm used
 * wrongly (norm_batch with scale or with a backward output, norm_invstd
 * without dx (but see below), norm_rvar with scale or norm_batch or
 * without norm_rmean; norm_rvar: the norm with running statistics, its
 * scale and shift made once here by ge_norm_affine and then used as scale
 * and shift),
 * 5 for a level without its kernels or, when it does not train, its
 * running statistics, 6 for an excite used wrongly (a forward one with a
 * backward input or output, or without out; a backward one, GE-theta-plus's
 * MLP, without the MLP or with identity, out, relu, gate, dcontext, level1,
 * context or grad_gate), 7 for running statistics to update (run_mean...)
 * in a call with grad or dx, or for a level that does not train or lacks
 * run_var, or without run_momentum, 8 for a backward without grad (the
 * gather's alone) without dcontext or with gate, excite or the norm, or
 * for raw in a backward. With x_cl, x, grad, dx and the
 * excite's identity and out are channels-last, (N, H, W, C) in memory;
 * else contiguous. With x_cl, a
 * forward call with grad and level1_out may take the norm's statistics
 * (norm_mean_in, norm_invstd): its level1_out then holds, per block, z',
 * S1 and S2 (see cl_prepass_units; N * h1 * w1 + 2 * N * hL * wL cells of
 * LANES), and a second call with level1_in and the same statistics skips
 * its first pass (GE-theta-plus's backward: the MLP runs in between). */
int ge_conv_gather(const float *x, const float *scale, const float *shift,
                   const float *const *weight, const float *const *gamma,
                   const float *const *beta, const float *const *rmean,
                   const float *const *rvar, const double *eps,
                   const int *train, const int *relu, int levels, int64_t N,
                   int64_t C, int64_t H, int64_t W, const int64_t *row_index,
                   const int64_t *col_index, const float *grad,
                   const float *gate, const float *dcontext,
                   const float *level1_in, float *level1_out,
                   float *const *raw, float *context, float *mean, float *var,
                   float *grad_gate, float *dx, float *dweight,
                   float *dgamma, float *dbeta, const float *norm_gamma,
                   const float *norm_beta, double norm_eps, int norm_batch,
                   const float *norm_mean_in, const float *norm_invstd,
                   int norm_train, float *norm_mean, float *norm_var,
                   float *norm_dgamma, float *norm_dbeta,
                   const float *norm_rmean, const float *norm_rvar,
                   float *const *run_mean, float *const *run_var,
                   int64_t *const *run_count, const double *run_momentum,
                   const struct ge_excite_spec *excite, int small_cl,
                   int x_cl, int threads) {
  if (levels < 1 || levels > MAX_LEVELS) return 2;
  /* the gate's gradient needs the input: a call that gets level 1 from a
   * previous one must have its context's gradient */
  if (level1_in && (grad_gate || (dx && !dcontext))) return 3;
  if (norm_batch && (scale || grad || dx || level1_in || !norm_mean ||
                     !norm_var))
    return 4;
  if (norm_invstd &&
      (!norm_mean_in || (dx ? !norm_dgamma || !norm_dbeta
                            : !(x_cl && level1_out && grad))))
    return 4;
  if (norm_rvar && (scale || norm_batch || !norm_rmean)) return 4;
  if (run_mean && (grad || dx)) return 7;
  /* the gather's backward alone: the context's gradient, no excite */
  if (dx && !grad && (!dcontext || gate || excite || norm_invstd)) return 8;
  if (raw && dx) return 8;
  for (int l = 0; run_mean && l < levels; ++l)
    if (run_mean[l] && (!train[l] || !run_var[l] || !run_momentum)) return 7;
  for (int l = 0; l < levels; ++l)
    if (!weight[l] || (!train[l] && (!rmean[l] || !rvar[l]))) return 5;
  /* a forward excite writes out; a backward one is GE-theta-plus's MLP,
   * whose gate and context gradient the call makes itself */
  if (excite && (dx ? !excite->mlp_w1 || excite->out || excite->identity ||
                          excite->relu || gate || dcontext || level1_in ||
                          level1_out || context || grad_gate
                    : grad || level1_in || level1_out || !excite->out))
    return 6;
  /* from here on excite is the forward's */
  const struct ge_excite_spec *mlp_backward = dx ? excite : NULL;
  if (dx) excite = NULL;
  struct conv_gather_args a = {
      .x = x, .scale = scale, .shift = shift, .weight = weight, .gamma = gamma,
      .beta = beta, .rmean = rmean, .rvar = rvar, .eps = eps,
      .train = train, .relu = relu, .levels = levels, .N = N, .C = C, .H = H,
      .W = W, .row_index = row_index, .col_index = col_index, .grad = grad,
      .gate = gate, .dcontext = dcontext, .level1_in = level1_in,
      .level1_out = level1_out, .raw = raw, .context = context, .mean = mean, .var = var,
      .grad_gate = grad_gate, .dx = dx, .dweight = dweight, .dgamma = dgamma,
      .dbeta = dbeta, .norm_gamma = norm_gamma, .norm_beta = norm_beta,
      .norm_mean_in = norm_mean_in, .norm_invstd = norm_invstd,
      .norm_eps = norm_eps, .norm_batch = norm_batch, .norm_train = norm_train,
      .norm_mean = norm_mean, .norm_var = norm_var, .norm_dgamma = norm_dgamma,
      .norm_dbeta = norm_dbeta, .run_mean = run_mean, .run_var = run_var,
      .run_count = run_count, .run_momentum = run_momentum,
      .excite = excite, .small_cl = small_cl,
      .cl = x_cl};
  const int64_t blocks = (C + LANES - 1) / LANES, plane = N * H * W * LANES;
  const int64_t h1 = (H + 1) / 2, w1 = (W + 1) / 2;
  /* the memory this call allocates: released together at the end */
  void *cl_memory = NULL;
  float *norm_affine = NULL, *buffers = NULL;
  int status = 0;
  if (x_cl) {
    /* the units: runs of at least CL_BAND rows, never splitting the rows of
     * a gate row; then what the passes keep per block and per unit */
    int64_t units = 1;
    int64_t *starts = (int64_t *)malloc(sizeof(int64_t) * (size_t)(H + 1));
    if (!starts) return 1;
    starts[0] = 0;
    for (int64_t p = 1; p < H; ++p)
      if (p - starts[units - 1] >= CL_BAND && row_index[p] != row_index[p - 1])
        starts[units++] = p;
    starts[units] = H;
    a.cl_units = units;
    const int64_t hL = (H + (1 << levels) - 1) >> levels;
    const int64_t wL = (W + (1 << levels) - 1) >> levels;
    const int64_t m1 = N * h1 * w1 * LANES, mg = N * hL * wL * LANES;
    const int need_gg = grad_gate != NULL || (dx && !dcontext);
    const size_t head = sizeof(struct cl_block) * (size_t)blocks +
                        sizeof(vd) * (size_t)(N * units * blocks * 9);
    a.cl_pz = cl_pitch(m1);
    a.cl_pg = cl_pitch(mg);
    a.cl_ps = cl_pitch(2 * mg);
    const int64_t floats =
        blocks * (a.cl_pz + (need_gg ? a.cl_pg : 0) + (dx ? a.cl_pg : 0) +
                  (norm_invstd ? a.cl_ps : 0));
    cl_memory = aligned_alloc(
        64, (head + sizeof(float) * (size_t)floats + 63) / 64 * 64);
    if (!cl_memory) {
      free(starts);
      return 1;
    }
    a.clb = (struct cl_block *)cl_memory;
    a.cl_part = (vd *)(a.clb + blocks);
    float *f = (float *)((char *)cl_memory + head);
    a.cl_z = f;
    f += blocks * a.cl_pz;
    if (need_gg) {
      a.cl_gg = f;
      f += blocks * a.cl_pg;
    }
    if (dx) {
      a.cl_gate = f;
      f += blocks * a.cl_pg;
    }
    if (norm_invstd) a.cl_s = f;
    a.cl_rows = starts;
  }
  plan(&a);
  if (norm_rvar) {
    norm_affine = (float *)malloc(sizeof(float) * (size_t)(3 * C));
    if (!norm_affine) status = 1;
    else {
      ge_norm_affine(norm_gamma, norm_beta, norm_rmean, norm_rvar, norm_eps,
                     C, norm_affine);
      a.scale = norm_affine + C;
      a.shift = norm_affine + 2 * C;
    }
  }
  const int64_t hL = a.h[levels], wL = a.w[levels], rows = N * hL * wL;
  float *gate_rows = NULL;
  if (!status && excite) {
    /* every block's context (GE-theta: its gate), then GE-theta-plus's
     * MLP's gate from all channels, then the excite */
    buffers = (float *)malloc(sizeof(float) * (size_t)(2 * rows * C + 2 * C));
    if (!buffers) status = 1;
    else {
      a.ctx_rows = buffers;
      a.affine = buffers + rows * C;
      gate_rows = excite->mlp_w1 ? a.affine + 2 * C : a.ctx_rows;
    }
  }
  if (!status && x_cl) {
    cl_init(&a);
    if (!level1_in) {
      status = for_planes(cl_prepass_units, &a, N * a.cl_units,
                          H * W * C / a.cl_units + 1, a.scratch, threads);
    } else if (norm_invstd) {
      /* the first pass's z', S1 and S2, from a first call's level1_out */
      const int64_t m1 = N * h1 * w1 * LANES, mg = N * hL * wL * LANES;
      for (int64_t b = 0; b < blocks; ++b) {
        memcpy(a.cl_z + b * a.cl_pz, level1_in + b * (m1 + 2 * mg),
               sizeof(float) * m1);
        memcpy(a.cl_s + b * a.cl_ps, level1_in + b * (m1 + 2 * mg) + m1,
               sizeof(float) * 2 * mg);
      }
    }
    if (!status && norm_batch)
      for (int64_t b = 0; b < blocks; ++b)
        for (int t = 0; t < 2; ++t) a.clb[b].sums[t] = cl_sum(&a, b, t);
  }
  if (!status && mlp_backward)
    status = mlp_backward_blocks(&a, mlp_backward, threads);
  else if (!status)
    status = for_planes(conv_gather_blocks, &a, blocks, plane, a.scratch,
                        threads);
  for (int l = 0; !status && run_mean && l < levels; ++l)
    if (run_mean[l] && run_count && run_count[l]) ++*run_count[l];
  if (!status && x_cl && dx) {
    /* the norm backward's outputs and mean terms (its sums from the
     * chain), the second pass, then level 1's kernels' gradient */
    const double m = (double)(N * H * W);
    for (int64_t b = 0; b < blocks; ++b) {
      struct cl_block *st = a.clb + b;
      const int64_t c0 = b * LANES;
      st->md = st->mdx = splat(0.f);
      for (int k = 0; norm_invstd && k < (int)min64(LANES, C - c0); ++k) {
        norm_dgamma[c0 + k] = (float)st->nsumx[k];
        norm_dbeta[c0 + k] = (float)st->nsum[k];
        if (norm_train) {
          st->md[k] = (float)(st->nsum[k] / m);
          st->mdx[k] = (float)(st->nsumx[k] / m);
        }
      }
    }
    status = for_planes(cl_postpass_units, &a, N * a.cl_units,
                        H * W * C / a.cl_units + 1, a.scratch, threads);
    for (int64_t b = 0; !status && b < blocks; ++b) {
      const int64_t c0 = b * LANES;
      for (int t = 0; t < 9; ++t) {
        const vd g = cl_sum(&a, b, t);
        for (int k = 0; k < (int)min64(LANES, C - c0); ++k)
          dweight[(c0 + k) * 9 + t] = (float)g[k];
      }
    }
  }
  if (!status && excite && excite->mlp_w1)
    status = ge_mlp_gate(a.ctx_rows, rows, C, excite->mlp_hidden,
                         excite->mlp_w1, excite->mlp_b1, excite->mlp_w2,
                         excite->mlp_b2, excite->mlp_relu, gate_rows,
                         threads);
  if (!status && excite && x_cl) {
    status = ge_excite_nhwc(x, a.affine, a.affine + C, gate_rows,
                            excite->identity, row_index, col_index,
                            excite->out, N, C, H, W, hL, wL, excite->relu,
                            threads);
  } else if (!status && excite) {
    /* the gate (N, C, hL, wL) lies channels-last in its rows */
    const int64_t strides[4] = {hL * wL * C, 1, wL * C, C};
    status = ge_excite(x, a.affine, a.affine + C, gate_rows, excite->identity,
                       row_index, col_index, excite->out, N * C, C, H, W, hL,
                       wL, strides, excite->relu, threads);
  }
  free(buffers);
  free(a.cl_rows);
  free(cl_memory);
  free(norm_affine);
  return status;
}
