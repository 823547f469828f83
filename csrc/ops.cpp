// Schemas of every compiled op of tcm_kernels, in one place. Implementations
// register per dispatch key next to their kernels (<op>/<op>_cpu.cpp,
// <op>/<op>_cuda.cu); autograd and fake (meta) functions are registered from
// Python in tcm_kernels/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(tcm, m) {
  // Random words of Philox-4x32-10: counters int64 [K, 4] (each in [0, 2^32)),
  // key = (seed_lo, seed_hi) -> int64 [K, 4]. Exposed for known-answer tests.
  m.def("philox4x32_10(Tensor counters, int seed) -> Tensor");
  // See tcm_kernels/ops/sample_mask.py for the contract and the bit recipe.
  m.def(
      "sample_mask(Tensor scores, int num_masked, str strategy, int seed, int offset, float temperature, "
      "float roi_threshold, float roi_mask_ratio, float hard_fraction) -> (Tensor visible, Tensor ids_keep, "
      "Tensor ids_restore)");
  // ---- sparse normalization and masked reconstruction loss ----
  // Masked-dense x [B, C, L] with mask bool [B, L]; per-plane tensors are [B, C]
  // in the opmath dtype of x (float32, or float64 for float64 x). See
  // tcm_kernels/ops/sparse_norm.py and csrc/sparse_norm/sparse_norm_cpu.cpp.
  m.def("masked_moments(Tensor x, Tensor mask) -> (Tensor count, Tensor mean, Tensor m2)");
  m.def("masked_scale_shift(Tensor x, Tensor mask, Tensor center, Tensor scale, Tensor shift) -> Tensor");
  m.def("masked_grad_moments(Tensor dy, Tensor x, Tensor mask, Tensor center) -> (Tensor sum_dy, Tensor sum_dy_xc)");
  m.def(
      "masked_norm_backward(Tensor dy, Tensor x, Tensor mask, Tensor dy_scale, Tensor x_scale, Tensor center, "
      "Tensor shift) -> Tensor");
  // The same engine over rows: x [N, C] (compact layout) with segment int64 [N] (None = one
  // segment) in any order; per-(segment, channel) tables [S, C] in the opmath dtype of x.
  // See tcm_kernels/ops/sparse_norm.py and csrc/sparse_norm/segment_norm_cpu.cpp.
  m.def("segment_moments(Tensor x, Tensor? segment, int num_segments) -> (Tensor count, Tensor mean, Tensor m2)");
  m.def("segment_scale_shift(Tensor x, Tensor? segment, Tensor center, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "segment_grad_moments(Tensor dy, Tensor x, Tensor? segment, Tensor center) -> (Tensor sum_dy, "
      "Tensor sum_dy_xc)");
  m.def(
      "segment_norm_backward(Tensor dy, Tensor x, Tensor? segment, Tensor dy_scale, Tensor x_scale, "
      "Tensor center, Tensor shift) -> Tensor");
  // Per-patch (normalized-pixel) MSE of pred vs target [B, C, *S] -> per_patch [B, N];
  // see tcm_kernels/ops/recon_loss.py.
  m.def("recon_loss_forward(Tensor pred, Tensor target, int[] patch_size, bool norm_pix, float eps) -> Tensor");
  m.def(
      "recon_loss_backward(Tensor grad_per_patch, Tensor pred, Tensor target, int[] patch_size, bool norm_pix, "
      "float eps) -> Tensor");
  // ---- submanifold sparse convolution (tcm_kernels/ops/submconv.py) ----
  // x [B, C, *S] masked-dense, mask bool [B, 1, *S], weight [Cout, Cin/groups, *k] (odd k), same padding.
  // chunk_rows: active rows per implicit-GEMM block (0 = sized to the cache).
  m.def(
      "submconv_forward(Tensor x, Tensor mask, Tensor weight, Tensor? bias, int[] dilation, int groups, "
      "int chunk_rows) -> Tensor");
  m.def(
      "submconv_weight_grad(Tensor grad_out, Tensor x, Tensor mask, Tensor weight, int[] dilation, int groups, "
      "int chunk_rows) -> Tensor");
  m.def("submconv_kernel_map(Tensor mask) -> (Tensor grid, Tensor sites)");
  // ---- contrastive (info_nce) ----
  // Tiled log-sum-exp of the logits S = inv_t * x @ y.T (x [M, D], y [N, D]) without
  // forming S: row_lse [M] and, when with_col, col_lse [N] (else empty), in fp32
  // (fp64 for fp64 input). See tcm_kernels/ops/info_nce.py.
  m.def("info_nce_lse(Tensor x, Tensor y, Tensor inv_t, bool with_col, int block) -> (Tensor row_lse, Tensor col_lse)");
  // Gradients of sum(grad_row_lse * row_lse) + sum(grad_col_lse * col_lse) w.r.t. x, y and inv_t, recomputing tiles.
  m.def(
      "info_nce_lse_backward(Tensor x, Tensor y, Tensor inv_t, Tensor row_lse, Tensor col_lse, Tensor grad_row_lse, "
      "Tensor grad_col_lse, int block) -> (Tensor grad_x, Tensor grad_y, Tensor grad_inv_t)");
  // ---- submconv compact ----
  // The engine of submconv_forward on the compact layout: features [N, Cin] (rows in any order), grid int32
  // [B, *S] (row of each active site or -1; it carries the geometry), sites int64 [N] (linear site of each
  // row), -> [N, Cout] in the features' dtype (fp32 accumulation).
  m.def(
      "submconv_compact_forward(Tensor features, Tensor grid, Tensor sites, Tensor weight, Tensor? bias, "
      "int[] dilation, int groups, int chunk_rows) -> Tensor");
  m.def(
      "submconv_compact_weight_grad(Tensor grad_out, Tensor features, Tensor grid, Tensor sites, Tensor weight, "
      "int[] dilation, int groups, int chunk_rows) -> Tensor");
}

// The extension is loaded with `import tcm_kernels._C`; it defines no Python
// functions, only the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
