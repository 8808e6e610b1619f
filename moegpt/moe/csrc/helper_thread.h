// A second thread for the decode kernels (see helper_thread.cpp).
#pragma once

namespace moegpt {

// fn(on_caller) on the calling thread and fn(on_helper) on the helper thread at once; returns when both are
// done, rethrowing what either threw. Runs both on the caller when another call holds the helper or it could
// not be started.
void run_beside(void (*fn)(void*), void* on_caller, void* on_helper);

// Whether the two halves of a run_beside call ran on different threads (for a test).
bool halves_run_on_two_threads();

}  // namespace moegpt
