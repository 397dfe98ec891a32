// Input-checking helpers shared by every vitkern C++ entry point.
// Python launchers validate first and raise clear TypeError/ValueError; these
// checks are the last line of defence so that a bad call from C++ or through
// torch.ops.vitkern_C (or a launcher bug) raises a RuntimeError instead of
// reading out of bounds.
#pragma once

#include <sstream>
#include <string>
#include <vector>

#include "stable.h"

#define VK_CHECK_CPU(x) VK_CHECK((x).is_cpu(), #x " must be a CPU tensor, got ", ::vitkern::device_str(x))
#define VK_CHECK_CONTIGUOUS(x) VK_CHECK((x).is_contiguous(), #x " must be contiguous")
#define VK_CHECK_FLOATING(x)                                                                  \
  VK_CHECK(::vitkern::is_floating((x).scalar_type()), #x " must be a floating tensor, got ", \
           ::vitkern::dtype_name((x).scalar_type()))

namespace vitkern {

// at::isFloatingType's list: the kernels read any of them as fp32.
inline bool is_floating(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Float:
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz:
      return true;
    default:
      return false;
  }
}

template <typename Seq>
std::string shape_str(const Seq& s) {
  std::ostringstream os;
  os << "(";
  size_t i = 0;
  for (auto v : s) os << (i++ ? ", " : "") << v;
  os << ")";
  return os.str();
}
inline std::string shape_str(const Tensor& x) { return shape_str(sizes_of(x)); }

// Checks x's sizes == expected; -1 in `expected` matches any size.
inline void check_shape(const Tensor& x, const char* name, const std::vector<int64_t>& expected) {
  bool ok = x.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || x.size(i) == expected[i];
  VK_CHECK(ok, name, " must have shape ", shape_str(expected), " (-1 = any), got ", shape_str(x));
}

}  // namespace vitkern
