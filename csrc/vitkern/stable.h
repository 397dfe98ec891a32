// The one place where vitkern's C++ meets torch: the LibTorch stable ABI
// (torch/csrc/stable, torch/headeronly), never <torch/extension.h> or ATen.
//
// The build sets TORCH_TARGET_VERSION (setup.py, TORCH_FLOOR): the headers then
// only offer what every torch from that release on provides, and _C loads with
// any torch >= the floor. The kernels work on raw pointers; this header gives
// them the few tensor operations the entry points need (allocate, cast, make
// contiguous, view, sum, mm, parallel_for, thread count), each one call into
// torch's C shim or its dispatcher.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef TORCH_TARGET_VERSION
#error "build vitkern._C with -DTORCH_TARGET_VERSION=<floor> (setup.py does): it pins the stable ABI it uses"
#endif

namespace vitkern {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<torch::stable::Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;
using Sizes = std::vector<int64_t>;

constexpr ScalarType kFloat = ScalarType::Float;

namespace detail {
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::runtime_error(os.str());
}
}  // namespace detail

// Raises RuntimeError in Python (the dispatcher turns the C++ exception into one)
// with the message built from the arguments, without a file/line prefix.
#define VK_CHECK(cond, ...)                                  \
  do {                                                       \
    if (!(cond)) ::vitkern::detail::fail(__VA_ARGS__);       \
  } while (0)

inline const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }
// The name Python users know (torch.float32 ...) for the kernels' floating dtypes.
inline const char* torch_dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      return "float32";
    case ScalarType::Double:
      return "float64";
    case ScalarType::BFloat16:
      return "bfloat16";
    case ScalarType::Half:
      return "float16";
    default:
      return torch::headeronly::toString(t);
  }
}

inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  std::ostringstream os;
  os << (t.is_cuda() ? "cuda:" : "a non-CPU device, index ") << static_cast<int>(t.get_device_index());
  return os.str();
}

inline Sizes sizes_of(const Tensor& t) {
  const auto s = t.sizes();
  return Sizes(s.begin(), s.end());
}

// --- allocation, casts, views (one dispatcher call each) ---------------------------------

inline Tensor empty(const Sizes& sizes, ScalarType dtype = kFloat) { return torch::stable::empty(sizes, dtype); }

inline Tensor zeros(const Sizes& sizes, ScalarType dtype = kFloat) {
  Tensor t = empty(sizes, dtype);
  torch::stable::zero_(t);
  return t;
}

// x cast to `dtype` (x itself when it already has it).
inline Tensor to(const Tensor& x, ScalarType dtype) {
  return x.scalar_type() == dtype ? x : torch::stable::to(x, dtype);
}
// An undefined tensor passes through (the "None" gradient of an optional argument).
inline Tensor to_or_undefined(const Tensor& x, ScalarType dtype) { return x.defined() ? to(x, dtype) : x; }

// (Named so that argument-dependent lookup cannot pick torch::stable::contiguous instead.)
inline Tensor contig(const Tensor& x) { return x.is_contiguous() ? x : torch::stable::contiguous(x); }

// fp32, contiguous: what the kernels read.
inline Tensor f32c(const Tensor& x) { return contig(to(x, kFloat)); }
inline Tensor opt_f32(const OptTensor& x) { return x.has_value() ? f32c(*x) : Tensor(); }

inline Tensor view_of(const Tensor& x, const Sizes& sizes) { return torch::stable::view(x, sizes); }
// aten::permute by the dispatcher call: torch::stable::permute exists only in the torch 2.14
// headers (its runtime floor is 2.10), and the sdist must build against torch 2.10-2.13 too.
inline Tensor permuted(const Tensor& x, const Sizes& dims) {
  std::array<StableIValue, 2> stack{torch::stable::detail::from(x),
                                    torch::stable::detail::from(torch::headeronly::IntHeaderOnlyArrayRef(dims))};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::permute", "", stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}
inline Tensor transposed(const Tensor& x) { return torch::stable::transpose(x, 0, 1); }

// Sum over dimension 0 (aten::sum.dim_IntList, what `.sum(0)` called before).
inline Tensor sum0(const Tensor& x) {
  const Sizes dim{0};
  return torch::stable::sum(x, torch::headeronly::IntHeaderOnlyArrayRef(dim));
}

// aten::mm through the stable dispatcher call (2-D x 2-D, any strides).
inline Tensor mm(const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 2> stack{torch::stable::detail::from(a), torch::stable::detail::from(b)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::mm", "", stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// A CPU fp32 tensor over memory owned by the caller (no copy, no deleter).
inline Tensor from_blob(float* data, const Sizes& sizes, const Sizes& strides) {
  return torch::stable::from_blob(data, sizes, strides, torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                  kFloat);
}

inline float* f32_ptr(const Tensor& x) { return x.mutable_data_ptr<float>(); }
inline float* f32_ptr_or_null(const Tensor& x) { return x.defined() ? f32_ptr(x) : nullptr; }

// --- threads --------------------------------------------------------------------------

inline int64_t num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

// Rows per tile when m rows are cut into equal tiles of at most max_rows, a multiple of the
// thread count of them (no thread gets a straggler tile).
inline int64_t even_tile_rows(int64_t m, int64_t max_rows) {
  const int64_t threads = num_threads() > 1 ? num_threads() : 1;
  const int64_t per_thread = (m + threads * max_rows - 1) / (threads * max_rows);
  const int64_t tiles = threads * (per_thread > 1 ? per_thread : 1);
  const int64_t rows = (m + tiles - 1) / tiles;
  return rows > 1 ? rows : 1;
}

// torch's intra-op thread pool (at::parallel_for behind the stable C shim).
template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  torch::stable::parallel_for(begin, end, grain, f);
}

// Task indices [0, n) handed out one at a time (parallel_tasks).
class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : n_(n) {}
  // The next task, or -1 when none is left.
  int64_t next() {
    const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
    return t < n_ ? t : -1;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_;
};

// Runs worker(queue) once on each of up to min(threads, n) of torch's intra-op threads; the
// workers pull task indices from the shared queue until it is empty. Unlike parallel_for's
// fixed shares, a thread that starts late or is descheduled (2 vCPUs on a shared host lose
// milliseconds at a time) holds up only the task it is running: the other threads take the
// rest. A worker sets up its per-thread scratch once, then loops
// `for (int64_t t; (t = q.next()) >= 0;)`. Which thread runs a task never changes what the
// task computes, so results do not depend on the schedule.
template <class W>
inline void parallel_tasks(int64_t n, const W& worker) {
  if (n <= 0) return;
  TaskQueue queue(n);
  const int64_t workers = std::min(num_threads(), n);
  if (workers <= 1) {
    worker(queue);
    return;
  }
  parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(queue);
  });
}

// Rows per task when m rows are cut into tasks for parallel_tasks: at most max_rows, and with
// more than one thread about kTasksPerThread tasks per thread (so a late thread's share is
// small) but not under min_rows; a multiple of `multiple` (the GEMM micro-kernel's rows).
constexpr int64_t kTasksPerThread = 4;
inline int64_t task_rows(int64_t m, int64_t max_rows, int64_t min_rows, int64_t multiple) {
  const int64_t threads = num_threads() > 1 ? num_threads() : 1;
  int64_t tasks = (m + max_rows - 1) / max_rows;
  if (threads > 1) tasks = std::max(tasks, threads * kTasksPerThread);
  int64_t rows = (m + tasks - 1) / tasks;
  rows = (rows + multiple - 1) / multiple * multiple;
  rows = std::min(std::max(rows, min_rows), max_rows);
  return std::max<int64_t>(1, std::min(rows, m));
}

}  // namespace vitkern
