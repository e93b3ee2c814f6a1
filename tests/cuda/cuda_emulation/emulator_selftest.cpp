// Self-test of cuda_emulator.h: tiny kernels written as CUDA kernels are, run on the CPU.
//   g++ -std=c++17 -O1 -Wall -Wextra -o /tmp/emu_selftest tests/cuda/cuda_emulation/emulator_selftest.cpp
//   /tmp/emu_selftest
// Prints the failed checks and returns 1 if any; returns 0 otherwise.
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "cuda_emulator.h"

// ---------------------------------------------------------------------------------------------
// Kernels, as they would be written for nvcc.
// ---------------------------------------------------------------------------------------------

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// The block's inclusive prefix sums of each thread's value (Hillis-Steele in shared memory:
// two barriers a step, so that no thread overwrites a value another still has to read);
// returns the block's total, the last prefix. All kThreads threads call it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_total_by_scan(acc_t value) {
  __shared__ acc_t prefix[kThreads];
  prefix[threadIdx.x] = value;
  __syncthreads();
  for (unsigned offset = 1; offset < kThreads; offset *= 2) {
    const acc_t left = threadIdx.x >= offset ? prefix[threadIdx.x - offset] : acc_t(0);
    __syncthreads();
    prefix[threadIdx.x] += left;
    __syncthreads();
  }
  return prefix[kThreads - 1];
}

// Grid-stride loop: doubled[i] = 2 * values[i], visits[i] += 1, and one sum of values per block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) scale_and_sum_kernel(const acc_t* __restrict__ values, int64_t count,
                                                                 acc_t* doubled, int* visits, acc_t* block_sums) {
  acc_t sum = 0;
  for (int64_t i = global_thread(); i < count; i += grid_threads()) {
    doubled[i] = 2 * values[i];
    visits[i] += 1;
    sum += values[i];
  }
  const acc_t block_total = block_total_by_scan(sum);
  if (threadIdx.x == 0) {
    block_sums[blockIdx.x] = block_total;
  }
}

struct Coordinates {
  unsigned thread_x, thread_y, thread_z, block_x, block_y, block_z, block_dim_x, block_dim_y, grid_dim_x, grid_dim_y;
};

__global__ void coordinates_kernel(Coordinates* out) {
  out[global_thread()] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y,
                          blockIdx.z,  blockDim.x,  blockDim.y,  gridDim.x,  gridDim.y};
}

// Every thread changes its own copy of `base`.
__global__ void parameter_copy_kernel(int base, int* out) {
  base += static_cast<int>(threadIdx.x);
  out[global_thread()] = base;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // complete in lane 0
}

template <typename acc_t>
__global__ void warp_sum_kernel(const acc_t* values, acc_t* warp_sums) {
  const acc_t sum = warp_sum(values[global_thread()]);
  if (threadIdx.x % kWarpSize == 0) {
    warp_sums[global_thread() / kWarpSize] = sum;
  }
}

// Every lane gets the sum of its segment of `width` lanes (an xor butterfly).
__global__ void segment_all_reduce_kernel(const double* values, int width, double* out) {
  double value = values[global_thread()];
  for (int lane_mask = width / 2; lane_mask > 0; lane_mask /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, lane_mask, width);
  }
  out[global_thread()] = value;
}

// One shuffle of each kind, each lane's own value being 1000 * lane + 7.
struct ShuffleResults {
  int down, xor_lanes, index;
};

__global__ void shuffle_kernel(int operand, int width, ShuffleResults* out) {
  const int value = 1000 * static_cast<int>(threadIdx.x % kWarpSize) + 7;
  ShuffleResults results;
  results.down = __shfl_down_sync(0xffffffffu, value, operand, width);
  results.xor_lanes = __shfl_xor_sync(0xffffffffu, value, operand, width);
  results.index = __shfl_sync(0xffffffffu, value, operand + static_cast<int>(threadIdx.x % 3), width);
  out[global_thread()] = results;
}

// Errors.

__global__ void early_return_before_syncthreads_kernel(int failing_block) {
  if (static_cast<int>(blockIdx.x) == failing_block && threadIdx.x < 56) {
    return;
  }
  __syncthreads();
}

__global__ void two_syncthreads_kernel() {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void syncthreads_against_shuffle_kernel(float* out) {
  float value = 1.0f;
  if (threadIdx.x < 16) {
    value = __shfl_down_sync(0xffffffffu, value, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = value;
}

__global__ void lanes_return_before_shuffle_kernel(float* out) {
  if (threadIdx.x % kWarpSize >= 16) {
    return;
  }
  out[threadIdx.x] = warp_sum(1.0f);
}

__global__ void two_shuffles_kernel(int* out) {
  int value = static_cast<int>(threadIdx.x);
  if (threadIdx.x % kWarpSize < 8) {
    value = __shfl_down_sync(0xffffffffu, value, 1);
  } else {
    value = __shfl_down_sync(0xffffffffu, value, 2);
  }
  out[threadIdx.x] = value;
}

__global__ void partial_mask_kernel(int* out) { out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1, 1); }

struct KernelFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

__global__ void throwing_kernel(int* blocks_started) {
  if (threadIdx.x == 0) {
    ++*blocks_started;
  }
  __syncthreads();
  if (blockIdx.x == 1 && threadIdx.x == 37) {
    throw KernelFailure("thread 37 of block 1 failed");
  }
}

__global__ void vector_load_kernel(const float* values, float* out) {
  cuda_emulator::check_aligned(values + 4 * global_thread(), 4 * sizeof(float), "values");
  out[global_thread()] = values[4 * global_thread()];
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

namespace {

int failures = 0;

void check(bool condition, const std::string& what) {
  if (!condition) {
    ++failures;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// `run` must throw Expected whose message contains `expected_text`.
template <typename Expected, typename Run>
void expect_throw(const std::string& what, const std::string& expected_text, Run run) {
  try {
    run();
    check(false, what + ": no exception");
  } catch (const Expected& error) {
    check(std::string(error.what()).find(expected_text) != std::string::npos,
          what + ": message \"" + error.what() + "\" lacks \"" + expected_text + "\"");
  } catch (const std::exception& error) {
    check(false, what + ": unexpected exception \"" + error.what() + "\"");
  }
}

template <typename acc_t>
void test_grid_stride_sum() {
  const int blocks = 3;
  const int64_t count = 5 * blocks * kThreads + 17;  // several elements per thread
  std::vector<acc_t> values(count);
  std::iota(values.begin(), values.end(), acc_t(1));
  std::vector<acc_t> doubled(count, 0);
  std::vector<int> visits(count, 0);
  std::vector<acc_t> block_sums(blocks, 0);
  cuda_emulator::launch_kernel(scale_and_sum_kernel<acc_t>, blocks, kThreads, nullptr, values.data(), count,
                               doubled.data(), visits.data(), block_sums.data());
  bool all_visited_once = true, all_doubled = true;
  for (int64_t i = 0; i < count; ++i) {
    all_visited_once &= visits[i] == 1;
    all_doubled &= doubled[i] == 2 * values[i];
  }
  check(all_visited_once, "grid-stride loop visits every element once");
  check(all_doubled, "grid-stride loop writes every element");
  const acc_t total = std::accumulate(block_sums.begin(), block_sums.end(), acc_t(0));
  check(total == acc_t(count * (count + 1) / 2), "block sums add up to the total");
  check(block_sums[0] != 0 && block_sums[1] != 0 && block_sums[2] != 0, "every block writes its sum");
}

void test_coordinates_and_parameters() {
  const int blocks = 2, threads = 64;
  std::vector<Coordinates> coordinates(blocks * threads);
  cuda_emulator::launch_kernel(coordinates_kernel, blocks, threads, nullptr, coordinates.data());
  bool right = true;
  for (unsigned i = 0; i < coordinates.size(); ++i) {
    const Coordinates& c = coordinates[i];
    right &= c.thread_x == i % threads && c.block_x == i / threads && c.block_dim_x == threads &&
             c.grid_dim_x == blocks && c.thread_y == 0 && c.thread_z == 0 && c.block_y == 0 && c.block_z == 0 &&
             c.block_dim_y == 1 && c.grid_dim_y == 1;
  }
  check(right, "threadIdx, blockIdx, blockDim, gridDim");

  std::vector<int> copies(blocks * threads);
  const long base = 100;  // converted to the kernel's int
  cuda_emulator::launch_kernel(parameter_copy_kernel, blocks, threads, nullptr, base, copies.data());
  bool own_copies = true;
  for (unsigned i = 0; i < copies.size(); ++i) own_copies &= copies[i] == 100 + static_cast<int>(i % threads);
  check(own_copies, "each thread has its own copy of the parameters");
}

template <typename acc_t>
void test_warp_sum() {
  const int blocks = 2, threads = 128;
  std::vector<acc_t> values(blocks * threads);
  std::iota(values.begin(), values.end(), acc_t(1));
  std::vector<acc_t> warp_sums(blocks * threads / kWarpSize);
  cuda_emulator::launch_kernel(warp_sum_kernel<acc_t>, blocks, threads, nullptr, values.data(), warp_sums.data());
  bool right = true;
  for (unsigned warp = 0; warp < warp_sums.size(); ++warp) {
    right &= warp_sums[warp] ==
             std::accumulate(values.begin() + warp * kWarpSize, values.begin() + (warp + 1) * kWarpSize, acc_t(0));
  }
  check(right, "warp sum by __shfl_down_sync, " + std::to_string(sizeof(acc_t)) + "-byte values");
}

void test_segment_all_reduce(int width) {
  const int threads = 64;
  std::vector<double> values(threads), out(threads);
  std::iota(values.begin(), values.end(), 1.0);
  cuda_emulator::launch_kernel(segment_all_reduce_kernel, 1, threads, nullptr, values.data(), width, out.data());
  bool right = true;
  for (int i = 0; i < threads; ++i) {
    const int first = i / width * width;
    right &= out[i] == std::accumulate(values.begin() + first, values.begin() + first + width, 0.0);
  }
  check(right, "segment sums by __shfl_xor_sync, width " + std::to_string(width));
}

// Expected results by the CUDA Programming Guide's rules, lane by lane.
void test_shuffle_rules(int operand, int width) {
  const int threads = 64;
  std::vector<ShuffleResults> out(threads);
  cuda_emulator::launch_kernel(shuffle_kernel, 1, threads, nullptr, operand, width, out.data());
  auto value_of = [](int lane) { return 1000 * lane + 7; };
  bool down = true, xor_lanes = true, index = true;
  for (int thread = 0; thread < threads; ++thread) {
    const int lane = thread % kWarpSize;
    const int segment_first = lane / width * width;
    down &= out[thread].down == value_of(lane % width + operand < width ? lane + operand : lane);
    const int partner = lane ^ operand;  // earlier segments may be read, later ones not
    xor_lanes &= out[thread].xor_lanes == value_of(partner < segment_first + width ? partner : lane);
    index &= out[thread].index == value_of(segment_first + (operand + thread % 3) % width);
  }
  const std::string where = ", operand " + std::to_string(operand) + ", width " + std::to_string(width);
  check(down, "__shfl_down_sync" + where);
  check(xor_lanes, "__shfl_xor_sync" + where);
  check(index, "__shfl_sync" + where);
}

void test_errors() {
  expect_throw<std::runtime_error>(
      "threads returning before __syncthreads",
      "barrier divergence in block 3: 200 of 256 threads wait at __syncthreads",
      [] { cuda_emulator::launch_kernel(early_return_before_syncthreads_kernel, 5, 256, nullptr, 3); });
  expect_throw<std::runtime_error>("different __syncthreads calls", "thread 128 at __syncthreads",
                                   [] { cuda_emulator::launch_kernel(two_syncthreads_kernel, 1, 256, nullptr); });
  std::vector<float> floats(256);
  expect_throw<std::runtime_error>("__syncthreads against a shuffle", "16 wait at a warp shuffle", [&] {
    cuda_emulator::launch_kernel(syncthreads_against_shuffle_kernel, 1, 64, nullptr, floats.data());
  });
  expect_throw<std::runtime_error>("lanes returning before a shuffle", "warp 0: 16 of 32 lanes wait at a shuffle", [&] {
    cuda_emulator::launch_kernel(lanes_return_before_shuffle_kernel, 1, 64, nullptr, floats.data());
  });
  std::vector<int> ints(256);
  expect_throw<std::runtime_error>("lanes at different shuffles", "warp shuffle divergence in block 0, warp 0", [&] {
    cuda_emulator::launch_kernel(two_shuffles_kernel, 1, 64, nullptr, ints.data());
  });
  expect_throw<std::invalid_argument>("a partial shuffle mask", "only the full mask", [&] {
    cuda_emulator::launch_kernel(partial_mask_kernel, 1, 32, nullptr, ints.data());
  });
  for (int threads : {0, 48, 1056}) {
    expect_throw<std::invalid_argument>("block of " + std::to_string(threads) + " threads", "multiple of 32", [&] {
      cuda_emulator::launch_kernel(two_syncthreads_kernel, 1, threads, nullptr);
    });
  }
  expect_throw<std::invalid_argument>("grid of 0 blocks", "blocks must be >= 1",
                                      [] { cuda_emulator::launch_kernel(two_syncthreads_kernel, 0, 32, nullptr); });

  int blocks_started = 0;
  expect_throw<KernelFailure>("exception thrown by a thread", "thread 37 of block 1 failed",
                              [&] { cuda_emulator::launch_kernel(throwing_kernel, 4, 64, nullptr, &blocks_started); });
  check(blocks_started == 2, "the grid stops at the block that threw");

  alignas(16) float values[4 * 64 + 1] = {};
  std::vector<float> loaded(64);
  cuda_emulator::launch_kernel(vector_load_kernel, 1, 64, nullptr, values, loaded.data());  // aligned: fine
  expect_throw<std::runtime_error>("misaligned vector load in a kernel", "(block 0, thread 0)", [&] {
    cuda_emulator::launch_kernel(vector_load_kernel, 1, 64, nullptr, values + 1, loaded.data());
  });
  expect_throw<std::runtime_error>("misaligned check_aligned", "misaligned access to row",
                                   [&] { cuda_emulator::check_aligned(values + 2, 16, "row"); });
}

}  // namespace

int main() {
  test_grid_stride_sum<double>();
  test_grid_stride_sum<int64_t>();
  test_coordinates_and_parameters();
  test_warp_sum<float>();
  test_warp_sum<double>();
  test_warp_sum<int>();
  test_warp_sum<int64_t>();
  for (int width : {8, 16, 32}) test_segment_all_reduce(width);
  for (int width : {8, 16, 32}) {
    for (int operand : {0, 1, 3, 8, 17}) test_shuffle_rules(operand, width);
  }
  test_errors();
  test_grid_stride_sum<double>();  // the emulator works on after errors
  test_coordinates_and_parameters();
  {
    std::vector<int> copies(1024);
    cuda_emulator::launch_kernel(parameter_copy_kernel, 1, 1024, nullptr, 0, copies.data());
    check(copies[1023] == 1023, "a block of 1024 threads");
  }
  if (failures > 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("cuda_emulator self-test passed\n");
  return 0;
}
