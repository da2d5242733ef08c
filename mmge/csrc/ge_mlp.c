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

/* hidden units [first, last) of every row: W1's row j is read once and
 * stays in the cache over the rows */
CLONED static void mlp_hidden(const void *args_, int64_t first, int64_t last,
                              float *unused) {
  const struct mlp_args *a = (const struct mlp_args *)args_;
  (void)unused;
  for (int64_t j = first; j < last; ++j) {
    const float *w = a->w1 + j * a->C, b = a->b1 ? a->b1[j] : 0.f;
    for (int64_t r = 0; r < a->R; ++r) {
      const float v = b + dot(a->in + r * a->C, w, a->C);
      a->hidden_out[r * a->hidden + j] = a->relu && v < 0.f ? 0.f : v;
    }
  }
}

/* output channels [first, last) of every row, then their sigmoid */
CLONED static void mlp_gate(const void *args_, int64_t first, int64_t last,
                            float *unused) {
  const struct mlp_args *a = (const struct mlp_args *)args_;
  (void)unused;
  for (int64_t c = first; c < last; ++c) {
    const float *w = a->w2 + c * a->hidden, b = a->b2 ? a->b2[c] : 0.f;
    for (int64_t r = 0; r < a->R; ++r)
      a->gate[r * a->C + c] =
          b + dot(a->hidden_out + r * a->hidden, w, a->hidden);
  }
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
