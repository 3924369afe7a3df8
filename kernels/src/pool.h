// A small fork-join pool for the kernels: created once, the calling thread works too.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace cv2k {

// Runs `fn(ctx, i)` for i in [0, n) on the calling thread plus the pool's workers.
//
// Work is claimed dynamically, one index at a time, so a worker that is not running
// (on a machine shared with other processes) delays nothing: the caller only waits
// for the workers that actually joined the job. Idle workers spin briefly (the
// projections of one decode step follow each other within microseconds) and then
// sleep on a futex, so the pool leaves the cores to OpenBLAS and others between
// bursts of work.
class Pool {
 public:
  using Fn = void (*)(const void* ctx, int64_t i);

  static Pool& get();

  // Threads used by run(), the caller included (>= 1).
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Rebuild with `threads` threads in all (1: the caller only).
  void resize(int threads);

  // Blocks until all n are done. If another thread is running a job, runs inline.
  void run(int64_t n, Fn fn, const void* ctx);

  ~Pool();

 private:
  Pool();
  void start(int n_workers);
  void stop();
  void worker_loop();
  bool try_join(uint64_t seen);
  void work();

  // state_: generation (high 32 bits) | closed flag (bit 31) | joined workers (low 31 bits)
  std::atomic<uint64_t> state_{0};
  std::atomic<uint32_t> wake_{0};  // futex word: bumped for every job and at shutdown
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> finished_{0};
  std::atomic<bool> quit_{false};
  std::mutex busy_;  // one job at a time (MLX may run several CPU streams)
  // The current job (written by the caller only while no worker is inside a job).
  Fn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::vector<std::thread> workers_;
};

// Threads to use by default: COSYVOICE2_KERNELS_THREADS if set, else the CPUs this
// process may run on, at most 8 (decode is bound by memory bandwidth).
int default_threads();

}  // namespace cv2k
