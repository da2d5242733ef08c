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

/* out[r][j] = act(b[j] + w[j] . in[r]) for units j in [first, last) of
 * every row r < R: in (R, K), w (units, K), out rows of out_width; act a
 * ReLU with relu. Unit j's weights are read once and stay in the cache
 * over the rows. */
INLINE void dense_units(const float *in, int64_t R, int64_t K,
                        const float *w, const float *b, int relu,
                        float *out, int64_t out_width, int64_t first,
                        int64_t last) {
  for (int64_t j = first; j < last; ++j) {
    const float *wj = w + j * K, bj = b ? b[j] : 0.f;
    for (int64_t r = 0; r < R; ++r) {
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
