/*
 * The entry points that ge_conv_gather.c calls when it excites what it
 * gathered in the same call (GE's inference and training forward, and
 * GE-theta-plus's backward): ge_excite and ge_excite_nhwc (ge_cpu.c),
 * GE-theta-plus's MLP gate ge_mlp_gate and its backward ge_mlp_backward
 * (ge_mlp.c), ge_norm_affine (ge_cpu.c) for a norm with
 * running statistics, and what that call is asked for, struct
 * ge_excite_spec.
 */
#ifndef MMGE_GE_EXCITE_H
#define MMGE_GE_EXCITE_H

#include <stdint.h>

/* The excite that ge_conv_gather runs after the gather, in the same call
 * (mirrored by cpu_kernels._ExciteSpec): out = y * resize(gate)
 * (+ identity), then a ReLU with relu, where the gate is sigmoid(context)
 * (GE-theta) or, with mlp_w1, ge_mlp_gate's (GE-theta-plus, its MLP
 * mlp_w1 (mlp_hidden, C), mlp_b1, mlp_w2 (C, mlp_hidden), mlp_b2, a ReLU
 * in between with mlp_relu). identity and out: (N, C, H, W) in x's
 * layout, identity NULL for none. In a backward call (GE-theta-plus's,
 * with dx) there is no identity, out or relu: the call runs the MLP's
 * backward between the gather's forward and backward and writes the
 * gradients of its weights and biases to mlp_dw1, mlp_db1, mlp_dw2,
 * mlp_db2 (each NULL for not wanted); mlp_context, when given, is the
 * context the forward gathered (rows (N * hL * wL, C)), which the call
 * then does not gather again. */
struct ge_excite_spec {
  const float *identity;
  float *out;
  const float *mlp_w1, *mlp_b1, *mlp_w2, *mlp_b2;
  int64_t mlp_hidden;
  int mlp_relu, relu;
  float *mlp_dw1, *mlp_db1, *mlp_dw2, *mlp_db2;
  const float *mlp_context;
};

/* ge_cpu.c's excite over whole tensors (see there) */
int ge_excite(const float *x, const float *scale, const float *shift,
              const float *gate, const float *identity,
              const int64_t *row_index, const int64_t *col_index, float *out,
              int64_t planes, int64_t channels, int64_t H, int64_t W,
              int64_t h, int64_t w, const int64_t *gate_stride, int relu,
              int threads);

/* ge_cpu.c's excite over channels-last tensors (see there) */
int ge_excite_nhwc(const float *x, const float *scale, const float *shift,
                   const float *gate, const float *identity,
                   const int64_t *row_index, const int64_t *col_index,
                   float *out, int64_t N, int64_t C, int64_t H, int64_t W,
                   int64_t h, int64_t w, int relu, int threads);

/* ge_mlp.c: GE-theta-plus's gate from its context rows in (R, C):
 * gate (R, C) = sigmoid(w2 act(w1 r + b1) + b2), w1 (hidden, C), w2
 * (C, hidden), act a ReLU when relu (else none), biases NULL for none.
 * Returns 0, or 1 when out of memory. */
int ge_mlp_gate(const float *in, int64_t R, int64_t C, int64_t hidden,
                const float *w1, const float *b1, const float *w2,
                const float *b2, int relu, float *gate, int threads);

/* ge_mlp.c: that MLP's backward for the gate's gradient gg (R, C): the
 * gate (R, C) again, the gradient of its input, dctx (R, C), and those of
 * w1, b1, w2 and b2 (each NULL for not wanted). Returns 0, or 1 when out
 * of memory. */
int ge_mlp_backward(const float *in, const float *gg, int64_t R, int64_t C,
                    int64_t hidden, const float *w1, const float *b1,
                    const float *w2, const float *b2, int relu, float *gate,
                    float *dctx, float *dw1, float *db1, float *dw2,
                    float *db2, int threads);

/* ge_cpu.c: a batch norm with running statistics as the per-channel
 * affine the kernels apply, out (3, C): invstd, scale, shift (see there) */
int ge_norm_affine(const float *weight, const float *bias, const float *mean,
                   const float *var, double eps, int64_t C, float *out);

#endif /* MMGE_GE_EXCITE_H */
