// The Python module vitkern._C, written against Python's limited API (Py_LIMITED_API,
// set by the build: one abi3 binary for every CPython >= 3.10). Importing it loads
// the shared library, whose static initialisers register the vitkern_C operators
// (bindings.cpp) with torch's dispatcher; torch must be imported first (vitkern/_ext.py
// does). The module itself only answers what the build is: no tensor crosses it.
#include <Python.h>

#include <cstdio>
#include <string>

#include "blas.h"
#include "gemm.h"
#include "simd.h"

#ifndef Py_LIMITED_API
#error "module.cpp is built with Py_LIMITED_API (setup.py: py_limited_api=True)"
#endif

namespace {

PyObject* simd_paths(PyObject*, PyObject*) {
  const std::string s = std::string(vitkern::simd::compiled_paths()) + "; active: " + vitkern::simd::active_path();
  return PyUnicode_FromString(s.c_str());
}
PyObject* blas_backend(PyObject*, PyObject*) { return PyUnicode_FromString(vitkern::blas_backend()); }

PyObject* gemm_route(PyObject*, PyObject*) { return PyUnicode_FromString(vitkern::gemm_route()); }
PyObject* packed_gemm_active(PyObject*, PyObject*) { return PyBool_FromLong(vitkern::packed_gemm_active()); }
PyObject* bf16_gemm_active(PyObject*, PyObject*) { return PyBool_FromLong(vitkern::bf16_gemm_active()); }

PyMethodDef methods[] = {
    {"simd_paths", simd_paths, METH_NOARGS, "the x86 SIMD code paths compiled into this build"},
    {"blas_backend", blas_backend, METH_NOARGS, "how the CPU kernels reach BLAS"},
    {"gemm_route", gemm_route, METH_NOARGS, "the route of the CPU kernels' weight GEMMs (gemm.h)"},
    {"packed_gemm_active", packed_gemm_active, METH_NOARGS, "whether the weight GEMMs take prepacked weights"},
    {"bf16_gemm_active", bf16_gemm_active, METH_NOARGS, "whether bf16 GEMMs run vitkern's AVX512-BF16 kernel"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "vitkern compiled CPU kernels (C++, LibTorch stable ABI); the operators are torch.ops.vitkern_C.*",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  char floor[16];
  std::snprintf(floor, sizeof floor, "%d.%d", static_cast<int>((TORCH_TARGET_VERSION >> 56) & 0xff),
                static_cast<int>((TORCH_TARGET_VERSION >> 48) & 0xff));
  if (PyModule_AddStringConstant(m, "OPS_NAMESPACE", "vitkern_C") < 0 ||
      PyModule_AddStringConstant(m, "TORCH_FLOOR", floor) < 0 ||
      PyModule_AddStringConstant(m, "BUILT_WITH_TORCH", TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "PY_LIMITED_API", Py_LIMITED_API) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
