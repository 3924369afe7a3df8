#include "pool.h"

#include <chrono>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sched.h>
#endif

namespace cv2k {

namespace {

constexpr uint64_t kClosed = 1ull << 31;
constexpr uint64_t kJoinedMask = kClosed - 1;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  try {
    return std::stoi(v);
  } catch (...) {
    return fallback;
  }
}

// How long an idle worker polls for the next job before sleeping.
std::chrono::microseconds spin_time() {
  static const int us = env_int("COSYVOICE2_KERNELS_SPIN_US", 50);
  return std::chrono::microseconds(us < 0 ? 0 : us);
}

}  // namespace

int default_threads() {
  int n = env_int("COSYVOICE2_KERNELS_THREADS", 0);
  if (n > 0) return n;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
#endif
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  return n < 8 ? n : 8;
}

Pool& Pool::get() {
  static Pool pool;
  return pool;
}

Pool::Pool() { start(default_threads() - 1); }

Pool::~Pool() { stop(); }

void Pool::start(int n_workers) {
  quit_.store(false);
  for (int i = 0; i < n_workers; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void Pool::stop() {
  quit_.store(true);
  wake_.fetch_add(1);
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void Pool::resize(int threads) {
  std::lock_guard<std::mutex> lock(busy_);
  stop();
  start(threads > 1 ? threads - 1 : 0);
}

void Pool::work() {
  for (int64_t i = next_.fetch_add(1, std::memory_order_relaxed); i < n_;
       i = next_.fetch_add(1, std::memory_order_relaxed)) {
    fn_(ctx_, i);
  }
}

bool Pool::try_join(uint64_t s) {
  const uint64_t gen = s >> 32;
  while (!(s & kClosed) && (s >> 32) == gen) {
    if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire)) return true;
  }
  return false;
}

void Pool::run(int64_t n, Fn fn, const void* ctx) {
  if (n <= 0) return;
  std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
  if (!lock.owns_lock() || workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i);
    return;
  }
  // No worker is inside a job here: the previous one was closed and all who joined finished.
  fn_ = fn;
  ctx_ = ctx;
  n_ = n;
  next_.store(0, std::memory_order_relaxed);
  finished_.store(0, std::memory_order_relaxed);
  const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
  state_.store(gen << 32, std::memory_order_release);
  wake_.fetch_add(1);
  if (sleepers_.load() > 0) wake_.notify_all();
  work();
  const uint64_t s = state_.fetch_or(kClosed, std::memory_order_acq_rel);
  const int joined = static_cast<int>(s & kJoinedMask);
  while (finished_.load(std::memory_order_acquire) < joined) cpu_relax();
}

void Pool::worker_loop() {
  uint64_t seen_gen = state_.load() >> 32;
  auto poll = [&]() -> bool {  // joins and runs a new open job; true if there was one
    uint64_t s = state_.load(std::memory_order_acquire);
    if ((s >> 32) == seen_gen) return false;
    seen_gen = s >> 32;
    if (try_join(s)) {
      work();
      finished_.fetch_add(1, std::memory_order_release);
    }
    return true;
  };
  while (!quit_.load(std::memory_order_relaxed)) {
    auto until = std::chrono::steady_clock::now() + spin_time();
    bool busy = false;
    for (int i = 0;; ++i) {
      if (quit_.load(std::memory_order_relaxed)) return;
      if (poll()) {
        busy = true;
        break;
      }
      if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) break;
      cpu_relax();
    }
    if (busy) continue;
    const uint32_t w = wake_.load();
    sleepers_.fetch_add(1);
    if (!quit_.load() && (state_.load() >> 32) == seen_gen) wake_.wait(w);
    sleepers_.fetch_sub(1);
  }
}

}  // namespace cv2k
