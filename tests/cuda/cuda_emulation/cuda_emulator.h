// cuda_emulator.h: runs CUDA kernels on the CPU, to test them on machines without a GPU.
//
// Include it before a header of CUDA kernel code compiled by g++ as plain C++17: the CUDA
// keywords become nothing (or `inline`, `static`), threadIdx, blockIdx, blockDim and gridDim read
// the emulated thread's values, and cuda_emulator::launch_kernel(kernel, blocks, threads, stream,
// args...) stands for kernel<<<blocks, threads, 0, stream>>>(args...).
//
// Emulated: a 1-D grid whose blocks run one after another, each block's threads as fibers
// (ucontext, 256 KiB of stack each) on the calling OS thread, switched only at barriers and in a
// fixed order, so runs are deterministic; __syncthreads(); the warp shuffles __shfl_sync,
// __shfl_down_sync and __shfl_xor_sync (full mask, all 32 lanes), by CUDA's lane and width rules.
// Caught: barriers that cannot complete (some threads returned, or wait at another barrier),
// threads of a block at different __syncthreads calls, lanes of a warp at different shuffles, any
// exception a kernel thread throws (launch_kernel rethrows it), misaligned vector loads
// (check_aligned, called by the kernel code), fiber stack overflow (a guard page: SIGSEGV).
// Not emulated: a memory model (threads run one after another between barriers, so data races do
// not show), concurrency between blocks, streams (launch_kernel returns when the grid is done),
// dynamic (extern) shared memory, 2-D and 3-D launches (y and z read 0 or 1). __shared__ variables
// are `static`: not reset between blocks. Threads of an aborted block are dropped without
// unwinding. Timing is meaningless.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// AddressSanitizer must be told of every switch between stacks.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMULATOR_ASAN(call) call
#else
#define CUDA_EMULATOR_ASAN(call)
#endif

using cudaStream_t = struct cuda_emulator_stream*;  // launches ignore it; nullptr is fine

namespace cuda_emulator {

struct Index3 {  // what threadIdx, blockIdx, blockDim and gridDim read as
  unsigned x, y, z;
};

namespace detail {

constexpr unsigned kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr std::size_t kFiberStackBytes = 256 * 1024;

// The barrier function a thread waits in, and the line of kernel code that called it.
struct CallSite {
  const char* function;
  const char* file;
  int line;

  bool operator!=(const CallSite& other) const {
    return std::strcmp(function, other.function) != 0 || std::strcmp(file, other.file) != 0 || line != other.line;
  }
  std::string describe() const { return std::string(function) + " (" + file + ":" + std::to_string(line) + ")"; }
};

enum class ThreadState { runnable, at_syncthreads, at_shuffle, returned };
enum class ShuffleMode { index, down, xor_lanes };

// One emulated thread: a fiber whose stack has an inaccessible guard page below it.
struct EmulatedThread {
  EmulatedThread() : guard_bytes(static_cast<std::size_t>(sysconf(_SC_PAGESIZE))) {
    mapping = mmap(nullptr, guard_bytes + kFiberStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) throw std::bad_alloc();
    mprotect(mapping, guard_bytes, PROT_NONE);
  }
  ~EmulatedThread() { munmap(mapping, guard_bytes + kFiberStackBytes); }
  EmulatedThread(const EmulatedThread&) = delete;
  EmulatedThread& operator=(const EmulatedThread&) = delete;
  void* stack_bottom() const { return static_cast<char*>(mapping) + guard_bytes; }

  std::size_t guard_bytes;
  void* mapping;
  ucontext_t context;
  void* asan_fake_stack = nullptr;
  ThreadState state = ThreadState::returned;
  CallSite waiting_at{};
  // The shuffle it waits at; shuffle_bits holds its value, then the value it receives.
  ShuffleMode shuffle_mode = ShuffleMode::index;
  unsigned shuffle_operand = 0;
  unsigned shuffle_width = 0;
  std::uint64_t shuffle_bits = 0;
};

struct BlockRun {
  std::vector<std::unique_ptr<EmulatedThread>>& threads;  // the first block_size are this block's
  unsigned block_size;
  unsigned grid_size;
  const std::function<void()>& thread_body;
  unsigned block_index = 0;
  unsigned running = 0;  // threadIdx.x of the thread now running
  unsigned returned_count = 0;
  std::exception_ptr error = nullptr;  // the first exception a thread threw
  ucontext_t scheduler_context{};
  void* asan_fake_stack = nullptr;  // the scheduler's side of the ASan fiber bookkeeping
  const void* scheduler_stack_bottom = nullptr;
  std::size_t scheduler_stack_size = 0;

  EmulatedThread& thread(unsigned index) const { return *threads[index]; }
  std::string where() const { return " in block " + std::to_string(block_index); }
};

inline thread_local BlockRun* running_block = nullptr;  // set while launch_kernel runs a grid

inline BlockRun& current_block() {
  if (running_block == nullptr) throw std::logic_error("CUDA built-in used outside cuda_emulator::launch_kernel");
  return *running_block;
}

inline Index3 current_thread_index() { return {current_block().running, 0, 0}; }
inline Index3 current_block_index() { return {current_block().block_index, 0, 0}; }
inline Index3 current_block_dim() { return {current_block().block_size, 1, 1}; }
inline Index3 current_grid_dim() { return {current_block().grid_size, 1, 1}; }

// From the scheduler into a thread of the block, until it waits at a barrier or returns.
inline void run_until_it_waits(BlockRun& block, unsigned index) {
  EmulatedThread& thread = block.thread(index);
  block.running = index;
  CUDA_EMULATOR_ASAN(__sanitizer_start_switch_fiber(&block.asan_fake_stack, thread.stack_bottom(), kFiberStackBytes));
  swapcontext(&block.scheduler_context, &thread.context);
  CUDA_EMULATOR_ASAN(__sanitizer_finish_switch_fiber(block.asan_fake_stack, nullptr, nullptr));
}

// From the running thread back to the scheduler; returns when the scheduler resumes it.
inline void yield_to_scheduler(BlockRun& block, EmulatedThread& thread) {
  [[maybe_unused]] const bool for_good = thread.state == ThreadState::returned;  // ASan may drop its fake stack
  CUDA_EMULATOR_ASAN(__sanitizer_start_switch_fiber(for_good ? nullptr : &thread.asan_fake_stack,
                                                    block.scheduler_stack_bottom, block.scheduler_stack_size));
  swapcontext(&thread.context, &block.scheduler_context);
  CUDA_EMULATOR_ASAN(__sanitizer_finish_switch_fiber(thread.asan_fake_stack, &block.scheduler_stack_bottom,
                                                     &block.scheduler_stack_size));
}

// Every fiber starts here. No exception may unwind past it: the first is kept for launch_kernel.
inline void thread_entry() {
  BlockRun& block = *running_block;
  EmulatedThread& thread = block.thread(block.running);
  CUDA_EMULATOR_ASAN(
      __sanitizer_finish_switch_fiber(nullptr, &block.scheduler_stack_bottom, &block.scheduler_stack_size));
  try {
    block.thread_body();
  } catch (...) {
    if (!block.error) block.error = std::current_exception();
  }
  thread.state = ThreadState::returned;
  ++block.returned_count;
  yield_to_scheduler(block, thread);
}

// Points a fiber at thread_entry. Out of line: to the compiler getcontext returns twice, which
// would make it warn (-Wclobbered) about the caller's variables.
__attribute__((noinline)) inline void restart_fiber(EmulatedThread& thread) {
  getcontext(&thread.context);
  thread.context.uc_stack.ss_sp = thread.stack_bottom();
  thread.context.uc_stack.ss_size = kFiberStackBytes;
  thread.context.uc_link = nullptr;
  makecontext(&thread.context, &thread_entry, 0);
  thread.state = ThreadState::runnable;
  thread.asan_fake_stack = nullptr;
}

inline void wait_at_barrier(ThreadState barrier, const CallSite& site) {
  BlockRun& block = current_block();
  EmulatedThread& thread = block.thread(block.running);
  thread.state = barrier;
  thread.waiting_at = site;
  yield_to_scheduler(block, thread);
}

template <typename T>
T shuffle(ShuffleMode mode, const CallSite& site, unsigned mask, T value, unsigned operand, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t), "values of up to 8 bytes");
  if (mask != 0xffffffffu) throw std::invalid_argument(site.describe() + ": only the full mask 0xffffffff is emulated");
  if (width < 1 || width > static_cast<int>(kWarpSize) || (width & (width - 1)) != 0) {
    throw std::invalid_argument(site.describe() + ": width must be a power of two <= 32, not " + std::to_string(width));
  }
  EmulatedThread& thread = current_block().thread(current_block().running);
  thread.shuffle_mode = mode;
  thread.shuffle_operand = operand;
  thread.shuffle_width = static_cast<unsigned>(width);
  std::memcpy(&thread.shuffle_bits, &value, sizeof(T));
  wait_at_barrier(ThreadState::at_shuffle, site);
  std::memcpy(&value, &thread.shuffle_bits, sizeof(T));
  return value;
}

// The lane whose value `lane` receives, as PTX shfl.sync picks it: a source outside the lane's
// segment of `width` lanes (for xor: in a later segment) gives the lane its own value.
inline unsigned source_lane(ShuffleMode mode, unsigned lane, unsigned operand, unsigned width) {
  const unsigned segment_first = lane & ~(width - 1);
  const unsigned segment_last = segment_first + width - 1;
  const unsigned offset = operand % kWarpSize;
  switch (mode) {
    case ShuffleMode::index:
      return segment_first + operand % width;
    case ShuffleMode::down:
      return lane + offset <= segment_last ? lane + offset : lane;
    case ShuffleMode::xor_lanes:
      return (lane ^ offset) <= segment_last ? lane ^ offset : lane;
  }
  throw std::logic_error("unknown shuffle mode");
}

inline std::string describe_shuffle(const EmulatedThread& thread) {
  return thread.waiting_at.describe() + " with width " + std::to_string(thread.shuffle_width);
}

// All 32 lanes of `warp` wait at a shuffle: checks that it is the same one, hands out the values.
inline void exchange_in_warp(BlockRun& block, unsigned warp) {
  EmulatedThread* lanes[kWarpSize];
  std::uint64_t sent[kWarpSize];
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    lanes[lane] = &block.thread(warp * kWarpSize + lane);
    sent[lane] = lanes[lane]->shuffle_bits;
    if (lanes[lane]->waiting_at != lanes[0]->waiting_at || lanes[lane]->shuffle_mode != lanes[0]->shuffle_mode ||
        lanes[lane]->shuffle_width != lanes[0]->shuffle_width) {
      throw std::runtime_error("warp shuffle divergence" + block.where() + ", warp " + std::to_string(warp) +
                               ": lane 0 waits at " + describe_shuffle(*lanes[0]) + ", lane " + std::to_string(lane) +
                               " at " + describe_shuffle(*lanes[lane]));
    }
  }
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    EmulatedThread& thread = *lanes[lane];
    thread.shuffle_bits = sent[source_lane(thread.shuffle_mode, lane, thread.shuffle_operand, thread.shuffle_width)];
    thread.state = ThreadState::runnable;
  }
}

inline unsigned count_in_state(const BlockRun& block, ThreadState state, unsigned first = 0, unsigned count = ~0u) {
  unsigned found = 0;
  for (unsigned i = first; i < block.block_size && i - first < count; ++i) found += block.thread(i).state == state;
  return found;
}

// Completes every barrier that all its threads have reached; false if none could complete.
inline bool release_barriers(BlockRun& block) {
  if (count_in_state(block, ThreadState::at_syncthreads) == block.block_size) {
    for (unsigned i = 0; i < block.block_size; ++i) {  // (a throw abandons the block)
      if (block.thread(i).waiting_at != block.thread(0).waiting_at) {
        throw std::runtime_error("barrier divergence" + block.where() + ": thread 0 waits at " +
                                 block.thread(0).waiting_at.describe() + ", thread " + std::to_string(i) + " at " +
                                 block.thread(i).waiting_at.describe());
      }
      block.thread(i).state = ThreadState::runnable;
    }
    return true;
  }
  bool released = false;
  for (unsigned warp = 0; warp < block.block_size / kWarpSize; ++warp) {
    if (count_in_state(block, ThreadState::at_shuffle, warp * kWarpSize, kWarpSize) == kWarpSize) {
      exchange_in_warp(block, warp);
      released = true;
    }
  }
  return released;
}

// Every thread still alive waits at a barrier that cannot complete: says which and why.
inline std::string describe_deadlock(const BlockRun& block) {
  auto first_in = [&](ThreadState state) {
    unsigned i = 0;
    while (block.thread(i).state != state) ++i;
    return i;
  };
  const unsigned returned = count_in_state(block, ThreadState::returned);
  const unsigned shuffling = count_in_state(block, ThreadState::at_shuffle);
  if (const unsigned syncing = count_in_state(block, ThreadState::at_syncthreads); syncing > 0) {
    return "barrier divergence" + block.where() + ": " + std::to_string(syncing) + " of " +
           std::to_string(block.block_size) + " threads wait at " +
           block.thread(first_in(ThreadState::at_syncthreads)).waiting_at.describe() + ", " + std::to_string(returned) +
           " returned, " + std::to_string(shuffling) + " wait at a warp shuffle";
  }
  // Only shuffles are waited at, so some lanes of this warp have returned.
  const unsigned first_lane = first_in(ThreadState::at_shuffle);
  const unsigned warp = first_lane / kWarpSize;
  const unsigned waiting = count_in_state(block, ThreadState::at_shuffle, warp * kWarpSize, kWarpSize);
  return "warp shuffle divergence" + block.where() + ", warp " + std::to_string(warp) + ": " + std::to_string(waiting) +
         " of 32 lanes wait at a shuffle (lane " + std::to_string(first_lane % kWarpSize) + " at " +
         describe_shuffle(block.thread(first_lane)) + "), " + std::to_string(kWarpSize - waiting) + " returned";
}

// Runs the block's threads round-robin, each until it waits or returns; then completes barriers.
inline void run_block(BlockRun& block) {
  for (unsigned i = 0; i < block.block_size; ++i) restart_fiber(block.thread(i));
  block.returned_count = 0;
  for (;;) {
    for (unsigned i = 0; i < block.block_size; ++i) {
      if (block.thread(i).state != ThreadState::runnable) continue;
      run_until_it_waits(block, i);
      if (block.error) return;
    }
    if (block.returned_count == block.block_size) return;
    if (!release_barriers(block)) throw std::runtime_error(describe_deadlock(block));
  }
}

inline void run_grid(int blocks, int threads, const std::function<void()>& thread_body) {
  if (blocks < 1) throw std::invalid_argument("launch_kernel: blocks must be >= 1, not " + std::to_string(blocks));
  if (threads < 1 || threads > kMaxBlockThreads || threads % static_cast<int>(kWarpSize) != 0) {
    throw std::invalid_argument("launch_kernel: threads must be a positive multiple of 32 up to 1024, not " +
                                std::to_string(threads));
  }
  if (running_block != nullptr) throw std::logic_error("launch_kernel: called from inside an emulated kernel");
  thread_local std::vector<std::unique_ptr<EmulatedThread>> fibers;  // made once, reused by every launch
  while (fibers.size() < static_cast<std::size_t>(threads)) fibers.push_back(std::make_unique<EmulatedThread>());
  BlockRun block{fibers, static_cast<unsigned>(threads), static_cast<unsigned>(blocks), thread_body};
  struct RunningBlockScope {
    explicit RunningBlockScope(BlockRun& run) { running_block = &run; }
    ~RunningBlockScope() { running_block = nullptr; }
  } scope(block);
  for (; block.block_index < block.grid_size; ++block.block_index) {
    run_block(block);
    if (block.error) std::rethrow_exception(block.error);
  }
}

}  // namespace detail

// Throws std::runtime_error unless `pointer` is a multiple of `bytes` (as a vector load needs).
inline void check_aligned(const void* pointer, std::size_t bytes, const char* what) {
  if (bytes == 0) throw std::invalid_argument("check_aligned: bytes must be positive");
  if (reinterpret_cast<std::uintptr_t>(pointer) % bytes == 0) return;
  std::ostringstream message;
  message << "misaligned access to " << what << ": address " << pointer << " is not a multiple of " << bytes
          << " bytes";
  if (const detail::BlockRun* block = detail::running_block) {
    message << " (block " << block->block_index << ", thread " << block->running << ")";
  }
  throw std::runtime_error(message.str());
}

// kernel<<<blocks, threads, 0, stream>>>(args...), done when it returns. Each thread gets its own
// copies of the arguments, converted to the kernel's parameter types. Throws std::invalid_argument
// for a bad launch shape, std::runtime_error for barrier divergence, and rethrows the first
// exception a kernel thread threw (the grid stops at that block).
template <typename... KernelParams, typename... Args>
void launch_kernel(void (*kernel)(KernelParams...), int blocks, int threads, cudaStream_t /*stream*/, Args&&... args) {
  static_assert(sizeof...(Args) == sizeof...(KernelParams), "launch_kernel: one argument per kernel parameter");
  static_assert((!std::is_reference_v<KernelParams> && ...), "launch_kernel: kernel parameters are passed by value");
  const std::tuple<KernelParams...> params{std::forward<Args>(args)...};
  detail::run_grid(blocks, threads, [&] { std::apply(kernel, params); });
}

}  // namespace cuda_emulator

#ifndef __CUDACC__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#define threadIdx (::cuda_emulator::detail::current_thread_index())
#define blockIdx (::cuda_emulator::detail::current_block_index())
#define blockDim (::cuda_emulator::detail::current_block_dim())
#define gridDim (::cuda_emulator::detail::current_grid_dim())
constexpr int warpSize = 32;

// The trailing file and line default to the caller's: they tell barrier calls apart and name
// them in error messages.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace ::cuda_emulator::detail;
  wait_at_barrier(ThreadState::at_syncthreads, {"__syncthreads", file, line});
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  using namespace ::cuda_emulator::detail;
  const unsigned operand = static_cast<unsigned>(src_lane);
  return shuffle(ShuffleMode::index, {"__shfl_sync", file, line}, mask, value, operand, width);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  using namespace ::cuda_emulator::detail;
  return shuffle(ShuffleMode::down, {"__shfl_down_sync", file, line}, mask, value, delta, width);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  using namespace ::cuda_emulator::detail;
  const unsigned operand = static_cast<unsigned>(lane_mask);
  return shuffle(ShuffleMode::xor_lanes, {"__shfl_xor_sync", file, line}, mask, value, operand, width);
}
#endif  // __CUDACC__
