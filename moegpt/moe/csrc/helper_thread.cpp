// The decode kernel's helper thread: one extra thread that takes half of a generated token's expert products.
//
// A decode step runs its ops on one intra-op thread, and OpenMP's pool is set to sleep after a short spin
// (moegpt.threads): every parallel region of a decode step would wake a sleeping thread, which costs more
// than its half of the work saves. This thread spins instead, for kSpinMicroseconds after each task (a
// decode step calls the kernel once per layer, well within that), then sleeps on a condition variable until
// the next call: between generations it costs nothing.
//
// One per process, made on first use (again in a forked child, whose parent's thread did not follow it), and
// never destroyed: a detached thread and its state outlive static destructors, so exit never waits on it.
#include "helper_thread.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace moegpt {
namespace {

constexpr int64_t kSpinMicroseconds = 1000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct Helper {
  std::mutex mutex;  // guards the sleep: a task is posted under it, so a falling-asleep helper cannot miss it
  std::condition_variable wake;
  std::atomic<uint64_t> posted{0}, done{0};  // tickets: the last task posted, the last one finished
  void (*fn)(void*) = nullptr;
  void* arg = nullptr;
  pid_t pid = 0;
};

void wait_for_task(Helper* h, uint64_t seen) {
  const auto start = std::chrono::steady_clock::now();
  for (int spins = 1; h->posted.load(std::memory_order_acquire) == seen; ++spins) {
    cpu_relax();
    if (spins % 256 == 0 &&
        std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinMicroseconds)) {
      std::unique_lock<std::mutex> lock(h->mutex);
      h->wake.wait(lock, [&] { return h->posted.load(std::memory_order_acquire) != seen; });
      return;
    }
  }
}

void helper_loop(Helper* h) {
  for (uint64_t seen = 0;;) {
    wait_for_task(h, seen);
    seen = h->posted.load(std::memory_order_acquire);
    h->fn(h->arg);
    h->done.store(seen, std::memory_order_release);
  }
}

std::mutex calls;  // one run_beside at a time owns the helper
Helper* helper = nullptr;

Helper* the_helper() {
  if (helper == nullptr || helper->pid != getpid()) {
    helper = new Helper();  // never freed: see the file's comment
    helper->pid = getpid();
    std::thread(helper_loop, helper).detach();
  }
  return helper;
}

}  // namespace

void run_beside(void (*fn)(void*), void* on_caller, void* on_helper) {
  std::unique_lock<std::mutex> owner(calls, std::try_to_lock);
  if (!owner.owns_lock()) {
    fn(on_caller);
    fn(on_helper);
    return;
  }
  Helper* h = the_helper();
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(h->mutex);
    h->fn = fn;
    h->arg = on_helper;
    ticket = h->posted.load(std::memory_order_relaxed) + 1;
    h->posted.store(ticket, std::memory_order_release);
  }
  h->wake.notify_one();
  fn(on_caller);
  while (h->done.load(std::memory_order_acquire) != ticket) cpu_relax();
}

}  // namespace moegpt
