/*
 * GE-theta-plus's excite MLP on the CPU: the gate
 * sigmoid(W2 act(W1 r + b1) + b2) of every row r of the gathered context,
 * the context being channels-last, (N * h * w, C). Its two 1x1
 * convolutions are small matrix products (a few MFLOP per layer); as ATen
 * calls they cost far more than their FLOPs right after a block's
 * convolutions have evicted the caches (six calls, a permute and a copy).
 * Here they are two loops of dot products, split over the hidden units,
 * then over the output channels, on PyTorch's OpenMP threads.
 */
#include <math.h>
#include <stdlib.h>

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

/* The eight dot products of rows r0..r0+3 of in with units j0, j0+1 of w
 * (K floats each), as one vector, lane 2 * row + unit: each product's
 * partial sums in a vector of its own, the eight reduced together by one
 * transpose instead of a horizontal sum each (GE-theta-plus's second layer
 * has rows of 16 in ResNet's first stage), and every loaded vector used
 * twice or four times */
INLINE vf dot_tile(const float *in, const float *w, int64_t K) {
  vf acc[LANES];
  for (int t = 0; t < LANES; ++t) acc[t] = splat(0.f);
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES) {
    const vf w0 = load(w + k), w1 = load(w + K + k);
    for (int r = 0; r < 4; ++r) {
      const vf x = load(in + r * K + k);
      acc[2 * r] += x * w0;
      acc[2 * r + 1] += x * w1;
    }
  }
  transpose8(acc); /* acc[i][t]: product t's i-th partial sum */
  vf s = acc[0];
  for (int i = 1; i < LANES; ++i) s += acc[i];
  for (; k < K; ++k)
    for (int t = 0; t < LANES; ++t)
      s[t] += in[(t / 2) * K + k] * w[(t % 2) * K + k];
  return s;
}

/* out[r][j] = act(b[j] + w[j] . in[r]) for units j in [first, last) of
 * every row r < R: in (R, K), w (units, K), out rows of out_width; act a
 * ReLU with relu. Tiles of four rows and two units (dot_tile), the rest
 * one product at a time. */
INLINE void dense_units(const float *in, int64_t R, int64_t K,
                        const float *w, const float *b, int relu,
                        float *out, int64_t out_width, int64_t first,
                        int64_t last) {
  const int64_t j_end = first + (last - first) / 2 * 2, r_end = R / 4 * 4;
  for (int64_t j = first; j < j_end; j += 2)
    for (int64_t r = 0; r < r_end; r += 4) {
      const vf s = dot_tile(in + r * K, w + j * K, K);
      for (int t = 0; t < LANES; ++t) {
        const float v = s[t] + (b ? b[j + t % 2] : 0.f);
        out[(r + t / 2) * out_width + j + t % 2] = relu && v < 0.f ? 0.f : v;
      }
    }
  for (int64_t j = first; j < last; ++j) {
    const float *wj = w + j * K, bj = b ? b[j] : 0.f;
    /* the rows past the tiles, and every row of a unit left over */
    for (int64_t r = j < j_end ? r_end : 0; r < R; ++r) {
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

/* output channels [first, last) of every row, then their sigmoid */
CLONED static void mlp_gate(const void *args_, int64_t first, int64_t last,
                            float *unused) {
  const struct mlp_args *a = (const struct mlp_args *)args_;
  (void)unused;
  dense_units(a->hidden_out, a->R, a->hidden, a->w2, a->b2, 0, a->gate,
              a->C, first, last);
  for (int64_t r = 0; r < a->R; ++r) {
    float *g = a->gate + r * a->C;
    int64_t c = first;
    for (; c + LANES <= last; c += LANES) store(g + c, sigmoid(load(g + c)));
    if (c < last) {
      vf v = splat(0.f);
      memcpy(&v, g + c, sizeof(float) * (last - c));
      v = sigmoid(v);
      memcpy(g + c, &v, sizeof(float) * (last - c));
    }
  }
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
