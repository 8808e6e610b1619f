// A second thread for the decode kernel (see helper_thread.cpp).
#pragma once

namespace moegpt {

// fn(on_caller) on the calling thread and fn(on_helper) on the helper thread at once; returns when both are
// done. fn must not throw. Runs both on the caller when another call holds the helper.
void run_beside(void (*fn)(void*), void* on_caller, void* on_helper);

}  // namespace moegpt
