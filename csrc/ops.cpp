// The op library ``structtoken`` (schemas in csrc/schemas.h) and the Python module ``structtoken_d2._C``
// whose import registers it. Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); autograd and fake
// (meta) kernels: structtoken_d2/ops/registrations.py.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(structtoken, m) { structtoken::define_ops(m); }

static PyModuleDef structtoken_module = {PyModuleDef_HEAD_INIT, "_C", "StructToken compiled ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&structtoken_module); }
