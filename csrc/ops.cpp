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
  // ---- contrastive (info_nce) ----
  // Tiled log-sum-exp of the logits S = inv_t * x @ y.T (x [M, D], y [N, D]) without
  // forming S: row_lse [M] and, when with_col, col_lse [N] (else empty), in fp32
  // (fp64 for fp64 input). See tcm_kernels/ops/info_nce.py.
  m.def("info_nce_lse(Tensor x, Tensor y, Tensor inv_t, bool with_col, int block) -> (Tensor row_lse, Tensor col_lse)");
  // Gradients of sum(grad_row_lse * row_lse) + sum(grad_col_lse * col_lse) w.r.t. x, y and inv_t, recomputing tiles.
  m.def(
      "info_nce_lse_backward(Tensor x, Tensor y, Tensor inv_t, Tensor row_lse, Tensor col_lse, Tensor grad_row_lse, "
      "Tensor grad_col_lse, int block) -> (Tensor grad_x, Tensor grad_y, Tensor grad_inv_t)");
}

// The extension is loaded with `import tcm_kernels._C`; it defines no Python
// functions, only the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
