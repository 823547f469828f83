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
}

// The extension is loaded with `import tcm_kernels._C`; it defines no Python
// functions, only the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
