/*
 * CPU kernels of Gather-Excite's fast path (mmge/models/layers/cpu_kernels.py).
 *
 * Plain C with a C ABI, called through ctypes on contiguous float32 NCHW
 * tensors (the _nhwc kernels: channels-last ones): one "plane" is one (n, c)
 * feature map of H x W floats. Each kernel makes one pass over its
 * full-resolution inputs, so GE costs a few memory passes per block instead
 * of the dozen small ATen calls of the same math.
 * Work is split over planes on PyTorch's OpenMP threads (see for_planes).
 *
 * The gather of GE-theta-minus with extent e is average pooling with kernel
 * 2e-1, stride e and padding e-1, padded cells not counted. Input row p lies
 * in window p / e, and also in window p / e + 1 unless p is a multiple of e
 * (the same for columns): every kernel below uses that, not a window loop.
 */
#include <math.h>
#include <string.h>

#include "ge_excite.h"
#include "ge_simd.h"
#include "ge_parallel.h"

/* sc, sh <- scale[c], shift[c] of channel c (1, 0 without scale) */
static void plane_affine(const float *scale, const float *shift, int64_t c,
                         float *sc, float *sh) {
  *sc = scale ? scale[c] : 1.f;
  *sh = scale ? shift[c] : 0.f;
}

/* dst[q] = src[col_index[q] * stride]: one gate row (its cells `stride`
 * floats apart) nearest-resized to width W */
static void widen_gate_row(const float *src, const int64_t *col_index,
                           int64_t stride, float *dst, int64_t W) {
  for (int64_t q = 0; q < W; ++q) dst[q] = src[col_index[q] * stride];
}

/* Cells of window i of a length-n axis (kernel 2e-1, stride e, pad e-1). */
static float window_count(int64_t i, int64_t e, int64_t n) {
  return (float)(min64(n - 1, i * e + e - 1) - max64(0, i * e - e + 1) + 1);
}

/* ------------------------------------------------------------------------ */
/* pool_forward: out = avg_pool(scale[c] * x + shift[c]) (scale/shift NULL:
 * plain x), out of shape (planes, h, w), h = ceil(H / e), w = ceil(W / e). */

struct pool_args {
  const float *x, *scale, *shift;
  float *out;
  int64_t channels, H, W, e, h, w;
};

/* acc[0, n) <- the sum of rows first..last (inclusive) of a plane whose
 * rows are W floats apart, n <= W: whole vectors summed in registers, the
 * last one overlapping the one before when n is not a multiple of LANES
 * (its cells are stored, not added, so the overlap is written twice with
 * the same values) */
INLINE void sum_rows(const float *rows, int64_t W, int64_t first,
                     int64_t last, float *acc, int64_t n) {
  if (n < LANES) {
    for (int64_t q = 0; q < n; ++q) {
      float v = 0.f;
      for (int64_t r = first; r <= last; ++r) v += rows[r * W + q];
      acc[q] = v;
    }
    return;
  }
  for (int64_t q = 0;; q += LANES) {
    if (q + LANES > n) q = n - LANES;
    const float *col = rows + q;
    vf v = load(col + first * W);
    for (int64_t r = first + 1; r <= last; ++r) v += load(col + r * W);
    store(acc + q, v);
    if (q + LANES == n) break;
  }
}

/* out (h, w) <- the pool of sc * x + sh for one plane x (H, W); cols:
 * scratch for one window's row sum, W floats. Window i covers rows
 * i * e - (e - 1) .. i * e + e - 1 (clipped), and columns alike. */
INLINE void pool_plane(const float *x, float *out, float *cols, int64_t H,
                       int64_t W, int64_t e, int64_t h, int64_t w, float sc,
                       float sh) {
  if (h == 1 && w == 1) {
    /* one window holds the plane (H, W <= e: ResNet's 7x7 maps at extent
     * 8): one flat sum */
    const int64_t n = H * W;
    vf part = splat(0.f);
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES) part += load(x + k);
    float sum = sum_lanes(part);
    for (; k < n; ++k) sum += x[k];
    out[0] = sum / (float)n * sc + sh;
    return;
  }
  for (int64_t i = 0; i < h; ++i) {
    sum_rows(x, W, max64(0, i * e - e + 1), min64(H, i * e + e) - 1, cols,
             W);
    float *o = out + i * w;
    const float ch = window_count(i, e, H);
    for (int64_t j = 0; j < w; ++j) {
      const int64_t q0 = max64(0, j * e - e + 1), q1 = min64(W, j * e + e);
      float v = 0.f;
      for (int64_t q = q0; q < q1; ++q) v += cols[q];
      o[j] = v / (ch * (float)(q1 - q0)) * sc + sh;
    }
  }
}

CLONED static void pool_planes(const void *args_, int64_t first,
                               int64_t last, float *cols) {
  const struct pool_args *a = (const struct pool_args *)args_;
  for (int64_t plane = first; plane < last; ++plane) {
    float sc, sh;
    plane_affine(a->scale, a->shift, plane % a->channels, &sc, &sh);
    pool_plane(a->x + plane * a->H * a->W, a->out + plane * a->h * a->w,
               cols, a->H, a->W, a->e, a->h, a->w, sc, sh);
  }
}

int ge_pool_forward(const float *x, const float *scale, const float *shift,
                    float *out, int64_t planes, int64_t channels, int64_t H,
                    int64_t W, int64_t e, int threads) {
  struct pool_args a = {x, scale, shift, out, channels, H, W, e,
                        (H + e - 1) / e, (W + e - 1) / e};
  return for_planes(pool_planes, &a, planes, H * W, W, threads);
}

/* ------------------------------------------------------------------------ */
/* gate_grad: out[i, j] = sum of grad * (scale[c] * x + shift[c]) over the
 * cells (p, q) with row_index[p] == i and col_index[q] == j: the adjoint of
 * the nearest resize (h, w) -> (H, W) applied to grad * x. The indices are
 * those F.interpolate(mode='nearest') uses, non-decreasing. */

/* The excite's whole backward (excite_backward) is the same pass: with y
 * (the output of an excite with its ReLU) grad is first masked by y > 0
 * (and written to masked when given), and with gate the input's gradient
 * dx = grad * resize(gate) is written on the way. */

struct gate_grad_args {
  const float *grad, *x, *scale, *shift;
  const int64_t *row_index, *col_index;
  float *out;
  int64_t channels, H, W, h, w;
  const float *y, *gate;
  float *dx, *masked;
};

/* A row of excite_backward: v = g (0 where y <= 0, with MASK), m <- v
 * (with WRITE_M), acc += v * x, dx <- v * wide (the gate's row resized) */
INLINE void excite_backward_row(const float *restrict g,
                                const float *restrict x,
                                const float *restrict y,
                                const float *restrict wide,
                                float *restrict acc, float *restrict dx,
                                float *restrict m, int64_t W, int MASK,
                                int WRITE_M) {
  for (int64_t q = 0; q < W; ++q) {
    float v = g[q];
    if (MASK) v = y[q] > 0.f ? v : 0.f;
    if (WRITE_M) m[q] = v;
    acc[q] += v * x[q];
    dx[q] = v * wide[q];
  }
}

static void gate_grad_planes(const void *args_, int64_t first, int64_t last,
                             float *buf) {
  const struct gate_grad_args *a = (const struct gate_grad_args *)args_;
  const int64_t H = a->H, W = a->W, h = a->h, w = a->w;
  /* acc: one row of grad * x summed over the rows of one gate row; wide:
   * the gate's row resized to W (W each) */
  float *acc = buf, *wide = buf + W;
  for (int64_t plane = first; plane < last; ++plane) {
    const int64_t at = plane * H * W;
    const float *g = a->grad + at;
    const float *x = a->x + at;
    float *out = a->out + plane * h * w;
    float sc, sh;
    plane_affine(a->scale, a->shift, plane % a->channels, &sc, &sh);
    memset(out, 0, sizeof(float) * h * w);
    int64_t p = 0;
    while (p < H) {
      /* rows p .. end - 1 share one gate row */
      int64_t i = a->row_index[p], end = p + 1;
      while (end < H && a->row_index[end] == i) ++end;
      memset(acc, 0, sizeof(float) * W);
      if (a->gate)
        widen_gate_row(a->gate + plane * h * w + i * w, a->col_index, 1,
                       wide, W);
      for (; p < end; ++p) {
        const float *gr = g + p * W, *xr = x + p * W;
        if (a->dx) {
          const int64_t r = at + p * W;
          const float *yr = a->y ? a->y + r : NULL;
          float *m = a->masked ? a->masked + r : NULL;
          /* constant cases, each loop vectorised */
          if (m)
            excite_backward_row(gr, xr, yr, wide, acc, a->dx + r, m, W, 1, 1);
          else if (yr)
            excite_backward_row(gr, xr, yr, wide, acc, a->dx + r, m, W, 1, 0);
          else
            excite_backward_row(gr, xr, yr, wide, acc, a->dx + r, m, W, 0, 0);
        } else if (a->scale) {
          for (int64_t q = 0; q < W; ++q) acc[q] += gr[q] * (sc * xr[q] + sh);
        } else {
          for (int64_t q = 0; q < W; ++q) acc[q] += gr[q] * xr[q];
        }
      }
      float *o = out + i * w;
      for (int64_t q = 0; q < W; ++q) o[a->col_index[q]] += acc[q];
    }
  }
}

int ge_gate_grad(const float *grad, const float *x, const float *scale,
                 const float *shift, const int64_t *row_index,
                 const int64_t *col_index, float *out, int64_t planes,
                 int64_t channels, int64_t H, int64_t W, int64_t h, int64_t w,
                 int threads) {
  struct gate_grad_args a = {grad, x, scale, shift, row_index, col_index,
                             out, channels, H, W, h, w, NULL, NULL, NULL,
                             NULL};
  return for_planes(gate_grad_planes, &a, planes, H * W, W, threads);
}

/* ------------------------------------------------------------------------ */
/* input_grad: out = grad * resize(gate) + avg_pool_backward(pool_grad)
 * (pool_grad NULL: no second term). gate is (h, w), resized with the
 * nearest indices; pool_grad is the gradient of the pool's output,
 * (ceil(H / e), ceil(W / e)). */

/* row[q] = sum of the window terms (d0 + d1, d1 may be NULL) of the
 * windows column q lies in: window q / e, and q / e + 1 unless q % e == 0 */
static void widen_windows(const float *d0, const float *d1, float *row,
                          float *col, int64_t pw, int64_t W, int64_t e) {
  for (int64_t j = 0; j < pw; ++j) col[j] = d1 ? d0[j] + d1[j] : d0[j];
  col[pw] = 0.f; /* past the last window */
  for (int64_t j = 0; j < pw; ++j) {
    int64_t q0 = j * e, q1 = min64(q0 + e, W);
    float both = col[j] + col[j + 1];
    row[q0] = col[j];
    for (int64_t q = q0 + 1; q < q1; ++q) row[q] = both;
  }
}

struct input_grad_args {
  const float *grad, *gate, *pool_grad;
  const int64_t *row_index, *col_index;
  float *out;
  int64_t H, W, h, w, e;
};

static void input_grad_planes(const void *args_, int64_t first, int64_t last,
                              float *buf) {
  const struct input_grad_args *a = (const struct input_grad_args *)args_;
  const int64_t H = a->H, W = a->W, h = a->h, w = a->w, e = a->e;
  const int64_t ph = a->pool_grad ? (H + e - 1) / e : 0;
  const int64_t pw = a->pool_grad ? (W + e - 1) / e : 0;
  /* gate_row: the gate row of the current row, widened to W;
   * pool_first / pool_rest: the pool term of the rows of the current
   * window block that start it (in window i only) and of the others (in
   * windows i and i + 1), widened to W; col: one row of those before
   * widening; div: pool_grad / window size */
  float *gate_row = buf, *pool_first = buf + W, *pool_rest = buf + 2 * W;
  float *col = buf + 3 * W, *div = col + pw + 1;
  for (int64_t plane = first; plane < last; ++plane) {
    const float *g = a->grad + plane * H * W;
    const float *gate = a->gate + plane * h * w;
    float *out = a->out + plane * H * W;
    if (a->pool_grad) {
      const float *pg = a->pool_grad + plane * ph * pw;
      for (int64_t i = 0; i < ph; ++i) {
        float ch = window_count(i, e, H);
        for (int64_t j = 0; j < pw; ++j)
          div[i * pw + j] = pg[i * pw + j] / (ch * window_count(j, e, W));
      }
    }
    int64_t gate_i = -1, block = -1;
    for (int64_t p = 0; p < H; ++p) {
      if (a->row_index[p] != gate_i) {
        gate_i = a->row_index[p];
        widen_gate_row(gate + gate_i * w, a->col_index, 1, gate_row, W);
      }
      const float *gr = g + p * W;
      float *o = out + p * W;
      if (!a->pool_grad) {
        for (int64_t q = 0; q < W; ++q) o[q] = gr[q] * gate_row[q];
        continue;
      }
      if (p == (block + 1) * e) {
        ++block;
        widen_windows(div + block * pw, NULL, pool_first, col, pw, W, e);
        widen_windows(div + block * pw,
                      block + 1 < ph ? div + (block + 1) * pw : NULL,
                      pool_rest, col, pw, W, e);
      }
      const float *pr = p == block * e ? pool_first : pool_rest;
      for (int64_t q = 0; q < W; ++q) o[q] = gr[q] * gate_row[q] + pr[q];
    }
  }
}

int ge_input_grad(const float *grad, const float *gate, const float *pool_grad,
                  const int64_t *row_index, const int64_t *col_index,
                  float *out, int64_t planes, int64_t H, int64_t W, int64_t h,
                  int64_t w, int64_t e, int threads) {
  struct input_grad_args a = {grad, gate, pool_grad, row_index, col_index,
                              out, H, W, h, w, e};
  int64_t ph = pool_grad ? (H + e - 1) / e : 0, pw = pool_grad ? (W + e - 1) / e : 0;
  return for_planes(input_grad_planes, &a, planes, H * W,
                    3 * W + pw + 1 + ph * pw, threads);
}

/* ------------------------------------------------------------------------ */
/* excite: out = y * resize(gate) (+ identity), y = scale[c] * x + shift[c]
 * (scale NULL: y = x), gate (h, w) resized to (H, W) with the nearest
 * indices; with relu, then max(out, 0) (the block's activation, NaN kept as
 * ATen's ReLU keeps it) in the same pass. out may be x itself (each element
 * is read before it is written). */

/* max(v, 0), NaN kept as ATen's ReLU keeps it */
static inline float relu_of(float v) { return v < 0.f ? 0.f : v; }

/* the same lane by lane: the lanes below 0 cleared (NaN is not below 0) */
INLINE vf relu_lanes(vf v) { return (vf)((vi)v & ~(v < splat(0.f))); }

/* o[k] = (sc * x[k] + sh) * g[k] (+ id[k]) for n elements (g[0] for all
 * without per_cell), then the ReLU with relu; o may be x. Explicit
 * vectors, so the compiler needs no run-time check of how o, x and id
 * overlap (it costs more than the work on ResNet's 7x7 and 14x14 rows);
 * from n = LANES on, the last n % LANES elements are those of one more
 * vector ending at n, computed before anything is stored (o may be x). */
INLINE void excite_run(float *o, const float *x, float sc, float sh,
                       const float *g, int per_cell, const float *id,
                       int64_t n, int relu) {
  const float a = sc * g[0], b = sh * g[0]; /* one gate value */
  const vf S = splat(per_cell ? sc : a), T = splat(per_cell ? sh : b);
#define RUN(VEXPR, EXPR)                                                \
  do {                                                                  \
    if (n < LANES) {                                                    \
      for (int64_t k = 0; k < n; ++k) {                                 \
        float v_ = (EXPR);                                              \
        if (id) v_ += id[k];                                            \
        o[k] = relu ? relu_of(v_) : v_;                                 \
      }                                                                 \
      break;                                                            \
    }                                                                   \
    vf last_ = splat(0.f);                                              \
    const int64_t tail_ = n % LANES;                                    \
    if (tail_) {                                                        \
      const int64_t k = n - LANES;                                      \
      last_ = (VEXPR);                                                  \
      if (id) last_ += load(id + k);                                    \
    }                                                                   \
    for (int64_t k = 0; k + LANES <= n; k += LANES) {                   \
      vf v_ = (VEXPR);                                                  \
      if (id) v_ += load(id + k);                                       \
      store(o + k, relu ? relu_lanes(v_) : v_);                         \
    }                                                                   \
    if (tail_) store(o + n - LANES, relu ? relu_lanes(last_) : last_);  \
  } while (0)
#define CASES(VEXPR, EXPR)                                              \
  do {                                                                  \
    if (id && relu) RUN(VEXPR, EXPR);                                   \
    else if (id) RUN(VEXPR, EXPR);                                      \
    else if (relu) RUN(VEXPR, EXPR);                                    \
    else RUN(VEXPR, EXPR);                                              \
  } while (0)
  if (per_cell)
    CASES((S * load(x + k) + T) * load(g + k), (sc * x[k] + sh) * g[k]);
  else
    CASES(load(x + k) * S + T, x[k] * a + b);
#undef CASES
#undef RUN
}

struct excite_args {
  const float *x, *scale, *shift, *gate, *identity;
  const int64_t *row_index, *col_index;
  float *out;
  int64_t channels, H, W, h, w;
  /* the gate's strides (N, C, h, w): any layout, channels-last included */
  int64_t gate_stride[4];
  int relu;
};

/* W rounded up to whole vectors */
static int64_t whole_vectors(int64_t W) {
  return (W + LANES - 1) / LANES * LANES;
}

/* scratch floats of excite_plane: a widened gate row and its cells'
 * offsets (int64), W rounded up to whole vectors each */
static int64_t excite_scratch(int64_t W) { return 3 * whole_vectors(W); }

/* excite_plane's scratch laid out at buf: *gate_row, then the returned
 * offsets[q] = col_index[q] * gate_w (the last column repeated up to whole
 * vectors), where a widened gate row reads its cells */
INLINE int64_t *excite_setup(float *buf, const int64_t *col_index,
                             int64_t gate_w, int64_t W, float **gate_row) {
  const int64_t Wv = whole_vectors(W);
  int64_t *offsets = (int64_t *)(buf + Wv);
  for (int64_t q = 0; q < Wv; ++q)
    offsets[q] = col_index[q < W ? q : W - 1] * gate_w;
  *gate_row = buf;
  return offsets;
}

/* out <- the excite of one plane x (H, W) with its gate (h rows at stride
 * gate_h, w columns read at the offsets of excite_setup), y = sc * x + sh,
 * plus id, then the ReLU. With one gate column, the rows that share a
 * gate row run as one flat loop on its value; else each gate row is
 * widened once, a vector at a time (whole-vector stores, which the row
 * loops' loads forward from), into gate_row (W rounded up to vectors). */
INLINE void excite_plane(const float *x, const float *id, const float *gate,
                         int64_t gate_h, const int64_t *offsets, float *out,
                         const int64_t *row_index, int64_t H, int64_t W,
                         int64_t w, float sc, float sh, int relu,
                         float *gate_row) {
  for (int64_t p = 0, end; p < H; p = end) {
    const int64_t gate_i = row_index[p];
    for (end = p + 1; end < H && row_index[end] == gate_i; ++end) {
    }
    const float *g = gate + gate_i * gate_h;
    if (w == 1) {
      excite_run(out + p * W, x + p * W, sc, sh, g, 0,
                 id ? id + p * W : NULL, (end - p) * W, relu);
      continue;
    }
    for (int64_t q = 0; q < W; q += LANES) {
      const int64_t *t = offsets + q;
      store(gate_row + q, (vf){g[t[0]], g[t[1]], g[t[2]], g[t[3]], g[t[4]],
                               g[t[5]], g[t[6]], g[t[7]]});
    }
    for (int64_t r = p; r < end; ++r)
      excite_run(out + r * W, x + r * W, sc, sh, gate_row, 1,
                 id ? id + r * W : NULL, W, relu);
  }
}

CLONED static void excite_planes(const void *args_, int64_t first,
                                 int64_t last, float *buf) {
  const struct excite_args *a = (const struct excite_args *)args_;
  const int64_t H = a->H, W = a->W, *gs = a->gate_stride;
  float *gate_row;
  const int64_t *offsets = excite_setup(buf, a->col_index, gs[3], W,
                                        &gate_row);
  /* the plane's sample and channel, counted on (no division per plane) */
  int64_t n = first / a->channels, c = first % a->channels;
  for (int64_t plane = first; plane < last; ++plane) {
    float sc, sh;
    plane_affine(a->scale, a->shift, c, &sc, &sh);
    excite_plane(a->x + plane * H * W,
                 a->identity ? a->identity + plane * H * W : NULL,
                 a->gate + n * gs[0] + c * gs[1], gs[2], offsets,
                 a->out + plane * H * W, a->row_index, H, W, a->w, sc, sh,
                 a->relu, gate_row);
    if (++c == a->channels) {
      c = 0;
      ++n;
    }
  }
}

int ge_excite(const float *x, const float *scale, const float *shift,
              const float *gate, const float *identity,
              const int64_t *row_index, const int64_t *col_index, float *out,
              int64_t planes, int64_t channels, int64_t H, int64_t W,
              int64_t h, int64_t w, const int64_t *gate_stride, int relu,
              int threads) {
  struct excite_args a = {x, scale, shift, gate, identity, row_index,
                          col_index, out, channels, H, W, h, w,
                          {gate_stride[0], gate_stride[1], gate_stride[2],
                           gate_stride[3]},
                          relu};
  return for_planes(excite_planes, &a, planes, H * W, excite_scratch(W),
                    threads);
}

/* ------------------------------------------------------------------------ */
/* excite_nhwc: ge_excite's excite on channels-last tensors: x, identity and
 * out are (N, H, W, C) in memory and the gate (N, h, w, C), so a cell's C
 * channels are contiguous everywhere and one gate cell serves a run of C
 * values. Work is split over the N * H rows. out may be x. */

struct excite_nhwc_args {
  const float *x, *scale, *shift, *gate, *identity;
  const int64_t *row_index, *col_index;
  float *out;
  int64_t C, H, W, h, w;
  int relu;
};

/* o[c] = (sc[c] * x[c] + sh[c]) * g[c] (+ id[c]) for the C channels of one
 * cell (sc NULL: y = x), then the ReLU with relu; each element is read
 * before it is written, so o may be x */
INLINE void excite_cell(float *o, const float *x, const float *sc,
                        const float *sh, const float *g, const float *id,
                        int64_t C, int relu) {
  int64_t c = 0;
  for (; c + LANES <= C; c += LANES) {
    vf v = load(x + c);
    if (sc) v = load(sc + c) * v + load(sh + c);
    v *= load(g + c);
    if (id) v += load(id + c);
    store(o + c, relu ? relu_lanes(v) : v);
  }
  for (; c < C; ++c) {
    float v = x[c];
    if (sc) v = sc[c] * v + sh[c];
    v *= g[c];
    if (id) v += id[c];
    o[c] = relu ? relu_of(v) : v;
  }
}

CLONED static void excite_nhwc_rows(const void *args_, int64_t first,
                                    int64_t last, float *buf) {
  const struct excite_nhwc_args *a = (const struct excite_nhwc_args *)args_;
  const int64_t C = a->C, H = a->H, W = a->W;
  (void)buf;
  for (int64_t row = first; row < last; ++row) {
    const int64_t n = row / H, p = row % H;
    const float *g = a->gate + (n * a->h + a->row_index[p]) * a->w * C;
    for (int64_t q = 0; q < W; ++q) {
      const int64_t at = (row * W + q) * C;
      excite_cell(a->out + at, a->x + at, a->scale, a->shift,
                  g + a->col_index[q] * C,
                  a->identity ? a->identity + at : NULL, C, a->relu);
    }
  }
}

int ge_excite_nhwc(const float *x, const float *scale, const float *shift,
                   const float *gate, const float *identity,
                   const int64_t *row_index, const int64_t *col_index,
                   float *out, int64_t N, int64_t C, int64_t H, int64_t W,
                   int64_t h, int64_t w, int relu, int threads) {
  struct excite_nhwc_args a = {x, scale, shift, gate, identity, row_index,
                               col_index, out, C, H, W, h, w, relu};
  return for_planes(excite_nhwc_rows, &a, N * H, W * C, 0, threads);
}

/* gate_grad_nhwc: gate_grad on channels-last tensors: grad and x are
 * (N, H, W, C) in memory, out (N, h, w, C); out[n, i, j] sums
 * grad * y over the cells (p, q) with row_index[p] == i and
 * col_index[q] == j, y = scale[c] * x + shift[c] (scale NULL: y = x).
 * Work is split over the N * h gate rows, each written by one thread. */

struct gate_grad_nhwc_args {
  const float *grad, *x, *scale, *shift;
  const int64_t *row_index, *col_index;
  float *out;
  int64_t C, H, W, h, w;
  const float *y, *gate;
  float *dx, *masked;
};

/* One cell's channels of excite_backward: g = grad (where y > 0 with y),
 * masked <- g, d += g * x, dx <- g * gate */
INLINE void excite_backward_cell(const struct gate_grad_nhwc_args *a,
                                 int64_t at, float *d, const float *gate) {
  const int64_t C = a->C;
  const float *g = a->grad + at, *x = a->x + at, *y = a->y ? a->y + at : NULL;
  float *m = a->masked ? a->masked + at : NULL, *dx = a->dx + at;
  int64_t c = 0;
  for (; c + LANES <= C; c += LANES) {
    vf v = load(g + c);
    if (y) v = where_positive(load(y + c), v);
    if (m) store(m + c, v);
    store(d + c, load(d + c) + v * load(x + c));
    store(dx + c, v * load(gate + c));
  }
  for (; c < C; ++c) {
    const float v = y && !(y[c] > 0.f) ? 0.f : g[c];
    if (m) m[c] = v;
    d[c] += v * x[c];
    dx[c] = v * gate[c];
  }
}

CLONED static void gate_grad_nhwc_rows(const void *args_, int64_t first,
                                       int64_t last, float *buf) {
  const struct gate_grad_nhwc_args *a =
      (const struct gate_grad_nhwc_args *)args_;
  const int64_t C = a->C, H = a->H, W = a->W, h = a->h, w = a->w;
  const float *sc = a->scale, *sh = a->shift;
  (void)buf;
  for (int64_t row = first; row < last; ++row) {
    const int64_t n = row / h, i = row % h;
    float *o = a->out + row * w * C;
    memset(o, 0, sizeof(float) * w * C);
    for (int64_t p = 0; p < H; ++p) {
      if (a->row_index[p] != i) continue;
      for (int64_t q = 0; q < W; ++q) {
        const int64_t at = ((n * H + p) * W + q) * C;
        const float *g = a->grad + at, *x = a->x + at;
        float *d = o + a->col_index[q] * C;
        if (a->dx) {
          excite_backward_cell(a, at, d,
                               a->gate + (row * w + a->col_index[q]) * C);
          continue;
        }
        int64_t c = 0;
        for (; c + LANES <= C; c += LANES) {
          vf y = load(x + c);
          if (sc) y = load(sc + c) * y + load(sh + c);
          store(d + c, load(d + c) + load(g + c) * y);
        }
        for (; c < C; ++c) d[c] += g[c] * (sc ? sc[c] * x[c] + sh[c] : x[c]);
      }
    }
  }
}

int ge_gate_grad_nhwc(const float *grad, const float *x, const float *scale,
                      const float *shift, const int64_t *row_index,
                      const int64_t *col_index, float *out, int64_t N,
                      int64_t C, int64_t H, int64_t W, int64_t h, int64_t w,
                      int threads) {
  struct gate_grad_nhwc_args a = {grad, x, scale, shift, row_index,
                                  col_index, out, C, H, W, h, w,
                                  NULL, NULL, NULL, NULL};
  return for_planes(gate_grad_nhwc_rows, &a, N * h, (H / h + 1) * W * C, 0,
                    threads);
}

/* ------------------------------------------------------------------------ */
/* excite_backward: the excite's gradients in one pass over grad and x (and
 * y): g = grad, masked by y > 0 where y (the output of an excite with its
 * ReLU) is given, and then written to masked when given; dx = g *
 * resize(gate); dgate = the resize's adjoint of g * x. gate and dgate are
 * (N, C, h, w), the others (N, C, H, W); all channels-last in memory with
 * cl, else contiguous. */
int ge_excite_backward(const float *grad, const float *x, const float *y,
                       const float *gate, const int64_t *row_index,
                       const int64_t *col_index, float *dx, float *masked,
                       float *dgate, int64_t N, int64_t C, int64_t H,
                       int64_t W, int64_t h, int64_t w, int cl,
                       int threads) {
  if (cl) {
    struct gate_grad_nhwc_args a = {grad, x, NULL, NULL, row_index,
                                    col_index, dgate, C, H, W, h, w,
                                    y, gate, dx, masked};
    return for_planes(gate_grad_nhwc_rows, &a, N * h, (H / h + 1) * W * C,
                      0, threads);
  }
  struct gate_grad_args a = {grad, x, NULL, NULL, row_index, col_index,
                             dgate, C, H, W, h, w, y, gate, dx, masked};
  return for_planes(gate_grad_planes, &a, N * C, H * W, 2 * W, threads);
}

/* ------------------------------------------------------------------------ */
/* pool_forward_nhwc and input_grad_nhwc: pool_forward and input_grad on
 * channels-last tensors: x, grad and out (N, H, W, C) in memory, the pool's
 * output, the gate and pool_grad (N, h, w, C). A row's W * C values are
 * contiguous, and so are the C channels of a cell: the work is one row at
 * a time, in vectors over the channels, split over the N * h output rows
 * (the pool) or the N * H input rows (the gradient). */

struct pool_nhwc_args {
  const float *x, *scale, *shift;
  float *out;
  int64_t C, H, W, e, h, w;
};

CLONED static void pool_nhwc_rows(const void *args_, int64_t first,
                                  int64_t last, float *cols) {
  const struct pool_nhwc_args *a = (const struct pool_nhwc_args *)args_;
  const int64_t C = a->C, H = a->H, W = a->W, e = a->e, h = a->h, w = a->w;
  const float *sc = a->scale, *sh = a->shift;
  /* cols: the sum of the window's rows, (W, C) */
  for (int64_t row = first; row < last; ++row) {
    const int64_t n = row / h, i = row % h;
    sum_rows(a->x + n * H * W * C, W * C, max64(0, i * e - e + 1),
             min64(H, i * e + e) - 1, cols, W * C);
    float *o = a->out + row * w * C;
    const float ch = window_count(i, e, H);
    for (int64_t j = 0; j < w; ++j) {
      const int64_t q0 = max64(0, j * e - e + 1), q1 = min64(W, j * e + e);
      const float count = ch * (float)(q1 - q0);
      int64_t c = 0;
      for (; c + LANES <= C; c += LANES) {
        vf v = load(cols + q0 * C + c);
        for (int64_t q = q0 + 1; q < q1; ++q) v += load(cols + q * C + c);
        v = v / count;
        if (sc) v = v * load(sc + c) + load(sh + c);
        store(o + j * C + c, v);
      }
      for (; c < C; ++c) {
        float v = 0.f;
        for (int64_t q = q0; q < q1; ++q) v += cols[q * C + c];
        v = v / count;
        o[j * C + c] = sc ? v * sc[c] + sh[c] : v;
      }
    }
  }
}

int ge_pool_forward_nhwc(const float *x, const float *scale,
                         const float *shift, float *out, int64_t N,
                         int64_t C, int64_t H, int64_t W, int64_t e,
                         int threads) {
  struct pool_nhwc_args a = {x, scale, shift, out, C, H, W, e,
                             (H + e - 1) / e, (W + e - 1) / e};
  return for_planes(pool_nhwc_rows, &a, N * a.h, (2 * e - 1) * W * C, W * C,
                    threads);
}

struct input_grad_nhwc_args {
  const float *grad, *gate, *pool_grad;
  const int64_t *row_index, *col_index;
  float *out;
  int64_t C, H, W, h, w, e;
};

CLONED static void input_grad_nhwc_rows(const void *args_, int64_t first,
                                        int64_t last, float *term) {
  const struct input_grad_nhwc_args *a =
      (const struct input_grad_nhwc_args *)args_;
  const int64_t C = a->C, H = a->H, W = a->W, h = a->h, w = a->w, e = a->e;
  const int64_t ph = (H + e - 1) / e, pw = (W + e - 1) / e;
  /* term: the pool term of the row's windows, per window column, (pw + 1,
   * C), the last one 0 (past the last window) */
  if (a->pool_grad) memset(term + pw * C, 0, sizeof(float) * C);
  for (int64_t row = first; row < last; ++row) {
    const int64_t n = row / H, p = row % H;
    const float *g = a->grad + row * W * C;
    const float *gate = a->gate + (n * h + a->row_index[p]) * w * C;
    float *o = a->out + row * W * C;
    if (a->pool_grad) {
      /* row p lies in window p / e, and in p / e + 1 unless p % e == 0 */
      const int64_t i0 = p / e, i1 = p % e && i0 + 1 < ph ? i0 + 1 : -1;
      const float *d0 = a->pool_grad + (n * ph + i0) * pw * C;
      const float c0 = window_count(i0, e, H);
      const float c1 = i1 < 0 ? 1.f : window_count(i1, e, H);
      for (int64_t j = 0; j < pw; ++j) {
        const float cw = window_count(j, e, W);
        for (int64_t c = 0; c < C; ++c) {
          float v = d0[j * C + c] / (c0 * cw);
          if (i1 >= 0) v += d0[(pw + j) * C + c] / (c1 * cw);
          term[j * C + c] = v;
        }
      }
    }
    for (int64_t q = 0; q < W; ++q) {
      const float *gq = g + q * C, *gt = gate + a->col_index[q] * C;
      float *oq = o + q * C;
      /* column q lies in window q / e, and in q / e + 1 unless q % e == 0
       * (window pw: the zero term) */
      const float *t0 = term + (q / e) * C;
      const float *t1 = term + (q % e ? min64(q / e + 1, pw) : pw) * C;
      int64_t c = 0;
      if (!a->pool_grad) {
        for (; c + LANES <= C; c += LANES)
          store(oq + c, load(gq + c) * load(gt + c));
        for (; c < C; ++c) oq[c] = gq[c] * gt[c];
        continue;
      }
      for (; c + LANES <= C; c += LANES)
        store(oq + c, load(gq + c) * load(gt + c) +
                          (load(t0 + c) + load(t1 + c)));
      for (; c < C; ++c) oq[c] = gq[c] * gt[c] + (t0[c] + t1[c]);
    }
  }
}

int ge_input_grad_nhwc(const float *grad, const float *gate,
                       const float *pool_grad, const int64_t *row_index,
                       const int64_t *col_index, float *out, int64_t N,
                       int64_t C, int64_t H, int64_t W, int64_t h, int64_t w,
                       int64_t e, int threads) {
  struct input_grad_nhwc_args a = {grad, gate, pool_grad, row_index,
                                   col_index, out, C, H, W, h, w, e};
  const int64_t pw = pool_grad ? (W + e - 1) / e : 0;
  return for_planes(input_grad_nhwc_rows, &a, N * H, W * C, (pw + 1) * C,
                    threads);
}

/* ------------------------------------------------------------------------ */
/* pool_excite: GE-theta-minus without autograd, plane by plane: the gate
 * sigmoid(pool(y)) of the plane, then its excite (with identity and relu as
 * ge_excite) while the plane is still in the cache, so that x is read from
 * memory once, not twice (ge_pool_forward, then ge_excite). out may be x
 * itself (a plane is pooled before it is written). */

struct pool_excite_args {
  const float *x, *scale, *shift, *identity;
  const int64_t *row_index, *col_index;
  float *out;
  int64_t channels, H, W, e, h, w;
  int relu;
};

/* planes pooled before their gates go through one vector sigmoid: up to
 * LANES, and no more than fit in half of a 1 MiB L2 cache together, so
 * that each is still cached when it is excited */
static int64_t pool_excite_group(int64_t H, int64_t W) {
  return max64(1, min64(LANES, (128 * 1024) / (H * W)));
}

CLONED static void pool_excite_planes(const void *args_, int64_t first,
                                      int64_t last, float *buf) {
  const struct pool_excite_args *a = (const struct pool_excite_args *)args_;
  const int64_t H = a->H, W = a->W, h = a->h, w = a->w, hw = h * w;
  const int64_t group = pool_excite_group(H, W);
  /* buf: excite_plane's scratch, a window's row sum (W), the gates of a
   * group of planes (whole vectors) */
  float *gate_row, *cols = buf + excite_scratch(W), *gate = cols + W;
  const int64_t *offsets = excite_setup(buf, a->col_index, 1, W, &gate_row);
  for (int64_t plane = first; plane < last; plane += group) {
    const int64_t planes = min64(group, last - plane);
    for (int64_t k = 0; k < planes; ++k) {
      float sc, sh;
      plane_affine(a->scale, a->shift, (plane + k) % a->channels, &sc, &sh);
      pool_plane(a->x + (plane + k) * H * W, gate + k * hw, cols, H, W, a->e,
                 h, w, sc, sh);
    }
    /* the cells past the group's gates are scratch: their sigmoid is
     * computed and never read */
    for (int64_t k = 0; k < planes * hw; k += LANES)
      store(gate + k, sigmoid(load(gate + k)));
    for (int64_t k = 0; k < planes; ++k) {
      const int64_t at = (plane + k) * H * W;
      float sc, sh;
      plane_affine(a->scale, a->shift, (plane + k) % a->channels, &sc, &sh);
      excite_plane(a->x + at, a->identity ? a->identity + at : NULL,
                   gate + k * hw, w, offsets, a->out + at, a->row_index, H,
                   W, w, sc, sh, a->relu, gate_row);
    }
  }
}

/* With norm_var (and no scale), y is the batch norm with running
 * statistics norm_mean, norm_var, weight norm_weight, bias norm_bias (NULL:
 * 1, 0) and norm_eps, its scale and shift made here (ge_norm_affine).
 * With x_cl, x, identity and out are channels-last, (N, H, W, C) in memory
 * (planes = N * C): the pool (pool_forward_nhwc) of the whole batch, then
 * its excite (excite_nhwc), two passes over x. Returns 0, or 1 when out of
 * memory. */
int ge_pool_excite(const float *x, const float *scale, const float *shift,
                   const float *identity, const int64_t *row_index,
                   const int64_t *col_index, float *out, int64_t planes,
                   int64_t channels, int64_t H, int64_t W, int64_t e,
                   const float *norm_weight, const float *norm_bias,
                   const float *norm_mean, const float *norm_var,
                   double norm_eps, int relu, int x_cl, int threads) {
  float *affine = NULL;
  if (norm_var && !scale) {
    affine = (float *)malloc(sizeof(float) * (size_t)(3 * channels));
    if (!affine) return 1;
    ge_norm_affine(norm_weight, norm_bias, norm_mean, norm_var, norm_eps,
                   channels, affine);
    scale = affine + channels;
    shift = affine + 2 * channels;
  }
  struct pool_excite_args a = {x, scale, shift, identity, row_index,
                               col_index, out, channels, H, W, e,
                               (H + e - 1) / e, (W + e - 1) / e, relu};
  if (x_cl) {
    const int64_t N = planes / channels, n = N * a.h * a.w * channels;
    float *gate = (float *)malloc(sizeof(float) * (size_t)(n + LANES));
    int status = gate ? 0 : 1;
    if (!status)
      status = ge_pool_forward_nhwc(x, scale, shift, gate, N, channels, H, W,
                                    e, threads);
    if (!status) {
      /* the pooled map is small: one thread; the tail as one more vector
       * of which only the gate's cells are kept */
      int64_t k = 0;
      for (; k + LANES <= n; k += LANES)
        store(gate + k, sigmoid(load(gate + k)));
      if (k < n) {
        vf v = splat(0.f);
        for (int64_t t = k; t < n; ++t) v[t - k] = gate[t];
        v = sigmoid(v);
        for (int64_t t = k; t < n; ++t) gate[t] = v[t - k];
      }
      status = ge_excite_nhwc(x, scale, shift, gate, identity, row_index,
                              col_index, out, N, channels, H, W, a.h, a.w,
                              relu, threads);
    }
    free(gate);
    free(affine);
    return status;
  }
  const int status = for_planes(
      pool_excite_planes, &a, planes, H * W,
      excite_scratch(W) + W +
          whole_vectors(pool_excite_group(H, W) * a.h * a.w),
      threads);
  free(affine);
  return status;
}

/* ------------------------------------------------------------------------ */
/* norm_affine: a batch norm with running statistics as the per-channel
 * affine the kernels apply, out (3, C): invstd = 1 / sqrt(var + eps) (in
 * float, as ATen's batch norm), scale = weight * invstd, shift = bias -
 * mean * scale (weight NULL: 1, bias NULL: 0). One call instead of half a
 * dozen small ATen ops, each of which costs tens of microseconds right
 * after a block's convolutions have evicted the caches. */
int ge_norm_affine(const float *weight, const float *bias, const float *mean,
                   const float *var, double eps, int64_t C, float *out) {
  for (int64_t c = 0; c < C; ++c) {
    const float invstd = 1.f / sqrtf(var[c] + (float)eps);
    const float scale = weight ? weight[c] * invstd : invstd;
    out[c] = invstd;
    out[C + c] = scale;
    out[2 * C + c] = (bias ? bias[c] : 0.f) - mean[c] * scale;
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* batch_stats: the sums a batch norm's statistics are made of, per plane
 * (NCHW, one (n, c) map) or per row (NHWC, one (n, p) row of W cells by C
 * channels): out[k, c] = (sum of x - pivot[c], sum of (x - pivot[c])^2),
 * in double, pivot[c] a value of channel c (the sums then stay small next
 * to the squares of the mean). Each part is summed by one thread in a fixed
 * order, and the caller adds the parts in order: the statistics do not
 * depend on the number of threads. */

struct stats_args {
  const float *x, *pivot;
  double *out;
  int64_t C, H, W;
};

CLONED static void stats_planes(const void *args_, int64_t first,
                                int64_t last, float *unused) {
  const struct stats_args *a = (const struct stats_args *)args_;
  const int64_t n = a->H * a->W;
  (void)unused;
  for (int64_t plane = first; plane < last; ++plane) {
    const float *x = a->x + plane * n;
    const float p = a->pivot[plane % a->C];
    const vf pv = splat(p);
    vf s = splat(0.f), q = splat(0.f);
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES) {
      const vf d = load(x + k) - pv;
      s += d;
      q += d * d;
    }
    double s1 = sum_lanes(s), s2 = sum_lanes(q);
    for (; k < n; ++k) {
      const double d = (double)x[k] - p;
      s1 += d;
      s2 += d * d;
    }
    a->out[2 * plane] = s1;
    a->out[2 * plane + 1] = s2;
  }
}

/* acc: 2 * C floats of scratch per thread */
CLONED static void stats_rows_nhwc(const void *args_, int64_t first,
                                   int64_t last, float *acc) {
  const struct stats_args *a = (const struct stats_args *)args_;
  const int64_t C = a->C, W = a->W;
  float *s = acc, *q = acc + C;
  for (int64_t row = first; row < last; ++row) {
    const float *x = a->x + row * W * C;
    memset(acc, 0, sizeof(float) * 2 * C);
    for (int64_t j = 0; j < W; ++j) {
      const float *xc = x + j * C;
      int64_t c = 0;
      for (; c + LANES <= C; c += LANES) {
        const vf d = load(xc + c) - load(a->pivot + c);
        store(s + c, load(s + c) + d);
        store(q + c, load(q + c) + d * d);
      }
      for (; c < C; ++c) {
        const float d = xc[c] - a->pivot[c];
        s[c] += d;
        q[c] += d * d;
      }
    }
    double *o = a->out + row * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      o[c] = s[c];
      o[C + c] = q[c];
    }
  }
}

int ge_batch_stats(const float *x, const float *pivot, double *out,
                   int64_t N, int64_t C, int64_t H, int64_t W, int nhwc,
                   int threads) {
  struct stats_args a = {x, pivot, out, C, H, W};
  if (nhwc)
    return for_planes(stats_rows_nhwc, &a, N * H, W * C, 2 * C, threads);
  return for_planes(stats_planes, &a, N * C, H * W, 0, threads);
}
