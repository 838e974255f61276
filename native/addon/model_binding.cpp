#include "addon/model_binding.h"

namespace sppo::addon {

// Calls running on libuv workers, across all models: the thread pool cannot be rebuilt under them.
std::atomic<int> g_running_calls{0};

void Job::OnOK() {
  owner_->release();
  deferred_.Resolve(result_(Env()));
}

void Job::OnError(const Napi::Error& e) {
  owner_->release();
  deferred_.Reject(e.Value());
}

}  // namespace sppo::addon
