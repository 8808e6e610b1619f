// The decode kernels' helper thread: one extra thread that takes half of a generated token's largest products.
//
// A decode step runs its ops on one intra-op thread, and OpenMP's pool is set to sleep after a short spin
// (moegpt.threads): every parallel region of a decode step would wake a sleeping thread, which costs more
// than its half of the work saves. This thread spins instead, for kSpinMicroseconds after each task (a
// decode step calls the kernels once per layer, well within that), then sleeps on a condition variable until
// the next call: between generations it costs nothing.
//
// One per process, made on first use (again in a forked child, whose parent's thread did not follow it), and
// never destroyed: a detached thread and its state outlive static destructors, so exit never waits on it.
// Whatever cannot use it (another call holds it, it could not be started) runs both halves on the caller.
#include "helper_thread.h"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace moegpt {
namespace {

constexpr int64_t kSpinMicroseconds = 1000;
// The caller waiting for the helper's half yields its core now and then: with fewer cores than threads
// (a CPU quota) the helper may be waiting for this very core.
constexpr int kSpinsBeforeYield = 4096;

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
  std::exception_ptr error;  // what the last task threw, published by `done`
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
    try {
      h->fn(h->arg);
    } catch (...) {
      h->error = std::current_exception();
    }
    h->done.store(seen, std::memory_order_release);
  }
}

// Process state, on the heap and never freed (see the file's comment); a forked child starts afresh: its
// parent's helper thread did not follow it, and another parent thread may have held `calls` at the fork.
struct State {
  std::mutex calls;  // one run_beside at a time owns the helper
  Helper* helper = nullptr;
  bool unavailable = false;  // the thread could not be started: run everything on the caller
};
State* state = new State();

void forget_in_child() { state = new State(); }

Helper* the_helper() {
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_in_child); });
  if (state->helper == nullptr && !state->unavailable) {
    auto* h = new Helper();
    try {
      std::thread(helper_loop, h).detach();
      state->helper = h;
    } catch (const std::system_error&) {
      delete h;
      state->unavailable = true;
    }
  }
  return state->helper;
}

void wait_for_half(Helper* h, uint64_t ticket) {
  for (int spins = 1; h->done.load(std::memory_order_acquire) != ticket; ++spins) {
    cpu_relax();
    if (spins % kSpinsBeforeYield == 0) std::this_thread::yield();
  }
}

}  // namespace

void run_beside(void (*fn)(void*), void* on_caller, void* on_helper) {
  State* s = state;
  std::unique_lock<std::mutex> owner(s->calls, std::try_to_lock);
  Helper* h = owner.owns_lock() ? the_helper() : nullptr;
  if (h == nullptr) {
    fn(on_caller);
    fn(on_helper);
    return;
  }
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(h->mutex);
    h->fn = fn;
    h->arg = on_helper;
    h->error = nullptr;
    ticket = h->posted.load(std::memory_order_relaxed) + 1;
    h->posted.store(ticket, std::memory_order_release);
  }
  h->wake.notify_one();
  std::exception_ptr error;
  try {
    fn(on_caller);
  } catch (...) {
    error = std::current_exception();
  }
  wait_for_half(h, ticket);  // even when the caller's half threw: the helper may still be using the arguments
  if (!error) error = h->error;
  if (error) std::rethrow_exception(error);
}

bool halves_run_on_two_threads() {
  std::thread::id ids[2];
  run_beside([](void* id) { *static_cast<std::thread::id*>(id) = std::this_thread::get_id(); }, &ids[0], &ids[1]);
  return ids[0] != ids[1];
}

}  // namespace moegpt
