/*
 * GE-theta-plus's excite MLP on the CPU: the gate
 * sigmoid(W2 act(W1 r + b1) + b2) of every row r of the gathered context,
 * the context being channels-last, (N * h * w, C). Its two 1x1
 * convolutions are small matrix products (a few MFLOP per layer); as ATen
 * calls they cost far more than their FLOPs right after a block's
 * convolutions have evicted the caches (six calls, a permute and a copy).
 * Here they are two loops of dot products, split over the hidden units,
 * then over the output channels, on PyTorch's OpenMP threads. Its
 * backward (ge_mlp_backward, which ge_conv_gather runs inside
 * GE-theta-plus's backward call) makes the gate again, then the gradients
 * of the context and of the weights and biases.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ge_excite.h"
#include "ge_parallel.h"
#include "ge_simd.h"

struct mlp_args {
  const float *in, *w1, *b1, *w2, *b2;
  float *hidden_out, *gate;
  int64_t R, C, hidden;
  int relu;
};

/* a . b over n floats: LANES-wide partial sums, then the tail */
INLINE float dot(const float *a, const float *b, int64_t n) {
  vf acc0 = splat(0.f), acc1 = splat(0.f);
  int64_t k = 0;
  for (; k + 2 * LANES <= n; k += 2 * LANES) {
    acc0 += load(a + k) * load(b + k);
    acc1 += load(a + k + LANES) * load(b + k + LANES);
  }
  for (; k + LANES <= n; k += LANES) acc0 += load(a + k) * load(b + k);
  float s = sum_lanes(acc0 + acc1);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

/* The eight dot products of rows r0..r0+3 of in with the units w0 and w1
 * (K floats each), as one vector, lane 2 * row + unit: each product's
 * partial sums in a vector of its own, the eight reduced together by one
 * transpose instead of a horizontal sum each (GE-theta-plus's second layer
 * has rows of 16 in ResNet's first stage), and every loaded vector used
 * twice or four times. A product's value does not depend on its partner
 * (w1 may be w0), so results do not depend on how units are split */
INLINE vf dot_tile(const float *in, const float *w0, const float *w1,
                   int64_t K) {
  vf acc[LANES];
  for (int t = 0; t < LANES; ++t) acc[t] = splat(0.f);
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES) {
    const vf u0 = load(w0 + k), u1 = load(w1 + k);
    for (int r = 0; r < 4; ++r) {
      const vf x = load(in + r * K + k);
      acc[2 * r] += x * u0;
      acc[2 * r + 1] += x * u1;
    }
  }
  transpose8(acc); /* acc[i][t]: product t's i-th partial sum */
  vf s = acc[0];
  for (int i = 1; i < LANES; ++i) s += acc[i];
  for (; k < K; ++k)
    for (int t = 0; t < LANES; ++t)
      s[t] += in[(t / 2) * K + k] * (t % 2 ? w1 : w0)[k];
  return s;
}

/* out[r][j] = act(b[j] + w[j] . in[r]) for units j in [first, last) of
 * every row r < R: in (R, K), w (units, K), b NULL for none, out rows of
 * out_width; act a ReLU with relu. Tiles of four rows and two units
 * (dot_tile; a last unit alone pairs with itself), the rows past the tiles
 * one product at a time: each value is computed the same way whatever the
 * range, so the result does not depend on the thread count. */
INLINE void dense_units(const float *in, int64_t R, int64_t K,
                        const float *w, const float *b, int relu,
                        float *out, int64_t out_width, int64_t first,
                        int64_t last) {
  const int64_t r_end = R / 4 * 4;
  for (int64_t j = first; j < last; j += 2) {
    const int pair = j + 1 < last;
    const float *w0 = w + j * K, *w1 = pair ? w0 + K : w0;
    for (int64_t r = 0; r < r_end; r += 4) {
      const vf s = dot_tile(in + r * K, w0, w1, K);
      for (int t = 0; t < LANES; ++t) {
        if (t % 2 && !pair) continue;
        const float v = s[t] + (b ? b[j + t % 2] : 0.f);
        out[(r + t / 2) * out_width + j + t % 2] = relu && v < 0.f ? 0.f : v;
      }
    }
  }
  for (int64_t j = first; j < last; ++j) {
    const float *wj = w + j * K, bj = b ? b[j] : 0.f;
    for (int64_t r = r_end; r < R; ++r) {
      const float v = bj + dot(in + r * K, wj, K);
      out[r * out_width + j] = relu && v < 0.f ? 0.f : v;
    }
  }
}

/* hidden units [first, last) of every row */
CLONED static void mlp_hidden(const void *args_, int64_t first, int64_t last,
                              float *unused) {
  const struct mlp_args *a = (const struct mlp_args *)args_;
  (void)unused;
  dense_units(a->in, a->R, a->C, a->w1, a->b1, a->relu, a->hidden_out,
              a->hidden, first, last);
}

/* n <= LANES floats at p as a vector (the rest 0), and back */
INLINE vf load_n(const float *p, int64_t n) {
  vf v = splat(0.f);
  memcpy(&v, p, sizeof(float) * n);
  return v;
}

INLINE void store_n(float *p, vf v, int64_t n) {
  memcpy(p, &v, sizeof(float) * n);
}

/* v[c] <- sigmoid(v[c]) for c in [first, last); with gg and dout also
 * dout[c] = gg[c] * g * (1 - g), the gradient through the sigmoid */
INLINE void sigmoid_cols(float *v, const float *gg, float *dout,
                         int64_t first, int64_t last) {
  for (int64_t c = first; c < last; c += LANES) {
    const int64_t n = min64(LANES, last - c);
    const vf g = sigmoid(load_n(v + c, n));
    store_n(v + c, g, n);
    if (dout) store_n(dout + c, load_n(gg + c, n) * g * (1.f - g), n);
  }
}

/* output channels [first, last) of every row, then their sigmoid */
CLONED static void mlp_gate(const void *args_, int64_t first, int64_t last,
                            float *unused) {
  const struct mlp_args *a = (const struct mlp_args *)args_;
  (void)unused;
  dense_units(a->hidden_out, a->R, a->hidden, a->w2, a->b2, 0, a->gate,
              a->C, first, last);
  for (int64_t r = 0; r < a->R; ++r)
    sigmoid_cols(a->gate + r * a->C, NULL, NULL, first, last);
}

int ge_mlp_gate(const float *in, int64_t R, int64_t C, int64_t hidden,
                const float *w1, const float *b1, const float *w2,
                const float *b2, int relu, float *gate, int threads) {
  float *hidden_out = (float *)malloc(sizeof(float) * (size_t)(R * hidden));
  if (!hidden_out) return 1;
  const struct mlp_args a = {in, w1, b1, w2, b2, hidden_out, gate,
                             R, C, hidden, relu};
  int status = for_planes(mlp_hidden, &a, hidden, R * C, 0, threads);
  if (!status) status = for_planes(mlp_gate, &a, C, R * hidden, 0, threads);
  free(hidden_out);
  return status;
}

/* The backward's operands and outputs (see ge_mlp_backward) and its
 * buffers: the hidden layer hid and its gradient dh (R, hidden), and dout
 * (R, C), the gradient through the gate's sigmoid. Its matrix products
 * run along the matrices' rows (a row times a scalar, added): no operand
 * is transposed, and every value is a sum in a fixed order, whatever the
 * threads' ranges. */
struct mlp_bwd_args {
  const float *in, *gg, *w1, *b1, *w2, *b2;
  float *gate, *dctx, *dw1, *db1, *dw2, *db2;
  int64_t R, C, hidden;
  int relu;
  float *hid, *dh, *dout;
};

/* the scaled rows' sums run in float over chunks of this many rows,
 * added up in double: sums over thousands of rows (a detector's context)
 * keep float32's precision */
#define ROW_CHUNK 64

/* LANES columns (n <= LANES) at c of four sums of K scaled rows,
 * out[q][c ..] = sum over k < K of coef[k * cs + q * ci] *
 * rows[k * width + c ..] for q < 4, each in k order (independent chains,
 * one load of each row for the four) */
INLINE void scaled_rows4(const float *coef, int64_t cs, int64_t ci,
                         const float *rows, int64_t width, int64_t K,
                         int64_t c, int64_t n, float *out,
                         int64_t out_width) {
  vd total[4] = {{0}, {0}, {0}, {0}};
  for (int64_t k0 = 0; k0 < K; k0 += ROW_CHUNK) {
    vf acc[4] = {splat(0.f), splat(0.f), splat(0.f), splat(0.f)};
    for (int64_t k = k0; k < min64(K, k0 + ROW_CHUNK); ++k) {
      const vf row = n == LANES ? load(rows + k * width + c)
                                : load_n(rows + k * width + c, n);
      const float *f = coef + k * cs;
      for (int q = 0; q < 4; ++q) acc[q] += f[q * ci] * row;
    }
    for (int q = 0; q < 4; ++q) total[q] += widen(acc[q]);
  }
  for (int q = 0; q < 4; ++q)
    store_n(out + q * out_width + c, __builtin_convertvector(total[q], vf),
            n);
}

/* the same for one sum */
INLINE void scaled_rows1(const float *coef, int64_t cs, const float *rows,
                         int64_t width, int64_t K, int64_t c, int64_t n,
                         float *out) {
  vd total = {0};
  for (int64_t k0 = 0; k0 < K; k0 += ROW_CHUNK) {
    vf acc = splat(0.f);
    for (int64_t k = k0; k < min64(K, k0 + ROW_CHUNK); ++k)
      acc += coef[k * cs] * (n == LANES ? load(rows + k * width + c)
                                        : load_n(rows + k * width + c, n));
    total += widen(acc);
  }
  store_n(out + c, __builtin_convertvector(total, vf), n);
}

/* out[i][c] = sum over k < K of coef[k * cs + i * ci] * rows[k * width +
 * c] for i < count and c in [first, last): sums of K scaled rows, each in
 * k order (by ROW_CHUNK) whatever the range, four of them at a time, each
 * output row written from start to end */
INLINE void scaled_rows(const float *coef, int64_t cs, int64_t ci,
                        const float *rows, int64_t width, int64_t K,
                        int64_t first, int64_t last, int64_t count,
                        float *out, int64_t out_width) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4)
    for (int64_t c = first; c < last; c += LANES)
      scaled_rows4(coef + i * ci, cs, ci, rows, width, K, c,
                   min64(LANES, last - c), out + i * out_width, out_width);
  for (; i < count; ++i)
    for (int64_t c = first; c < last; c += LANES)
      scaled_rows1(coef + i * ci, cs, rows, width, K, c,
                   min64(LANES, last - c), out + i * out_width);
}

/* out[c] = sum over k < K of v[k * stride + c] for c in [first, last), in
 * double, LANES columns at a time */
INLINE void column_sums(const float *v, int64_t K, int64_t stride,
                        int64_t first, int64_t last, float *out) {
  for (int64_t c = first; c < last; c += LANES) {
    const int64_t n = min64(LANES, last - c);
    vd acc = {0};
    for (int64_t k = 0; k < K; ++k) acc += widen(load_n(v + k * stride + c, n));
    for (int64_t t = 0; t < n; ++t) out[c + t] = (float)acc[t];
  }
}

/* step 1, hidden units [first, last): the hidden layer */
CLONED static void mlp_bwd_hidden(const void *args_, int64_t first,
                                  int64_t last, float *unused) {
  const struct mlp_bwd_args *a = (const struct mlp_bwd_args *)args_;
  (void)unused;
  dense_units(a->in, a->R, a->C, a->w1, a->b1, a->relu, a->hid, a->hidden,
              first, last);
}

/* step 2, channels [first, last): the gate, dout, and b2's and w2's
 * gradients: db2[c] = sum_r dout[r][c], dw2[c][:] = sum_r dout[r][c]
 * hid[r][:] */
CLONED static void mlp_bwd_gate(const void *args_, int64_t first,
                                int64_t last, float *unused) {
  const struct mlp_bwd_args *a = (const struct mlp_bwd_args *)args_;
  (void)unused;
  const int64_t R = a->R, C = a->C, hidden = a->hidden;
  dense_units(a->hid, R, hidden, a->w2, a->b2, 0, a->gate, C, first, last);
  for (int64_t r = 0; r < R; ++r)
    sigmoid_cols(a->gate + r * C, a->gg + r * C, a->dout + r * C, first,
                 last);
  if (a->db2) column_sums(a->dout, R, C, first, last, a->db2);
  if (a->dw2)
    scaled_rows(a->dout + first, C, 1, a->hid, hidden, R, 0, hidden,
                last - first, a->dw2 + first * hidden, hidden);
}

/* step 3, hidden units [LANES first, LANES last): their gradient
 * dh[r][j] = sum_c dout[r][c] w2[c][j] (then the ReLU's), b1's and w1's:
 * db1[j] = sum_r dh[r][j], dw1[j][:] = sum_r dh[r][j] in[r][:] */
CLONED static void mlp_bwd_dhidden(const void *args_, int64_t first,
                                   int64_t last, float *unused) {
  const struct mlp_bwd_args *a = (const struct mlp_bwd_args *)args_;
  (void)unused;
  const int64_t R = a->R, C = a->C, hidden = a->hidden;
  const int64_t j0 = first * LANES, j1 = min64(last * LANES, hidden);
  scaled_rows(a->dout, 1, C, a->w2, hidden, C, j0, j1, R, a->dh, hidden);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = j0; j < j1; ++j)
      if (a->relu && !(a->hid[r * hidden + j] > 0.f))
        a->dh[r * hidden + j] = 0.f;
  if (a->db1) column_sums(a->dh, R, hidden, j0, j1, a->db1);
  if (a->dw1)
    scaled_rows(a->dh + j0, hidden, 1, a->in, C, R, 0, C, j1 - j0,
                a->dw1 + j0 * C, C);
}

/* step 4, channels [LANES first, LANES last): the input's gradient
 * dctx[r][c] = sum_j dh[r][j] w1[j][c] */
CLONED static void mlp_bwd_input(const void *args_, int64_t first,
                                 int64_t last, float *unused) {
  const struct mlp_bwd_args *a = (const struct mlp_bwd_args *)args_;
  (void)unused;
  const int64_t C = a->C;
  scaled_rows(a->dh, 1, a->hidden, a->w1, C, a->hidden, first * LANES,
              min64(last * LANES, C), a->R, a->dctx, C);
}

int ge_mlp_backward(const float *in, const float *gg, int64_t R, int64_t C,
                    int64_t hidden, const float *w1, const float *b1,
                    const float *w2, const float *b2, int relu, float *gate,
                    float *dctx, float *dw1, float *db1, float *dw2,
                    float *db2, int threads) {
  float *buf =
      (float *)malloc(sizeof(float) * (size_t)(R * (2 * hidden + C)));
  if (!buf) return 1;
  struct mlp_bwd_args a = {in, gg, w1, b1, w2, b2, gate, dctx, dw1, db1,
                           dw2, db2, R, C, hidden, relu};
  a.hid = buf;
  a.dh = a.hid + R * hidden;
  a.dout = a.dh + R * hidden;
  const int64_t work = R * C;
  int status = for_planes(mlp_bwd_hidden, &a, hidden, work, 0, threads);
  if (!status) status = for_planes(mlp_bwd_gate, &a, C, work, 0, threads);
  if (!status)
    status = for_planes(mlp_bwd_dhidden, &a, (hidden + LANES - 1) / LANES,
                        work * LANES, 0, threads);
  if (!status)
    status = for_planes(mlp_bwd_input, &a, (C + LANES - 1) / LANES,
                        work * LANES, 0, threads);
  free(buf);
  return status;
}
