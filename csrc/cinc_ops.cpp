// The op schemas, defined once. Each backend file registers its own implementations
// (TORCH_LIBRARY_IMPL(cinc, CPU | CUDA, m)); a CPU-only build simply leaves the .cu files out.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import cinc_kernels._C` loads this library, which runs the registrations below. The module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cinc, m) {
  // y = M x + bias (docs/spec.md §1).
  m.def("forward(Tensor x, Tensor weight, Tensor? bias, bool unit_diagonal) -> Tensor");
  // x = M⁻¹ (y - bias), wavefront over anti-diagonals.
  m.def("inverse(Tensor y, Tensor weight, Tensor? bias, bool unit_diagonal) -> Tensor");
  // u = M⁻ᵀ g, wavefront from the bottom-right corner.
  m.def("inverse_transpose(Tensor g, Tensor weight, bool unit_diagonal) -> Tensor");
  // log|det M| = H·W·Σ log|L[c, c]|, a 0-dim tensor of weight's dtype. SymInt sizes, so that torch.export with
  // dynamic H and W keeps them symbolic; the kernels take int64_t, which the dispatcher unpacks from a SymInt.
  m.def("logdet(Tensor weight, SymInt height, SymInt width, bool unit_diagonal) -> Tensor");
}
