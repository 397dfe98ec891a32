// Input-checking helpers shared by every vitkern C++ entry point.
// Python launchers validate first and raise clear TypeError/ValueError; these
// TORCH_CHECKs are the last line of defence so that a bad call from C++ (or a
// launcher bug) raises a RuntimeError instead of reading out of bounds.
#pragma once

#include <torch/extension.h>

#include <sstream>
#include <vector>

#define VK_CHECK_DEVICE(x, dev)                                                      \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())

#define VK_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())

#define VK_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

#define VK_CHECK_FLOATING(x)                                                            \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be a floating tensor, got ", \
              (x).scalar_type())

#define VK_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())

namespace vitkern {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ")";
  return os.str();
}

// Checks x.sizes() == expected; -1 in `expected` matches any size.
inline void check_shape(const at::Tensor& x, const char* name, std::vector<int64_t> expected) {
  bool ok = x.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || x.size(i) == expected[i];
  TORCH_CHECK(ok, name, " must have shape ", shape_str(expected), " (-1 = any), got ", shape_str(x.sizes()));
}

}  // namespace vitkern
