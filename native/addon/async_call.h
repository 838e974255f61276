// The one way the binding runs slow work, as a Promise: a call's arguments were read on the JS
// thread into a plain struct (args.h), `work(args)` runs on a libuv worker and fills in its
// results, and `to_js(env, args)` turns them into the Promise's value back on the JS thread.
// An exception from `work` rejects the Promise with its message. The struct, and the typed
// arrays it holds, live until the call settles; `settled()` then runs first, on the JS thread.
#pragma once
#include <napi.h>

#include <exception>
#include <utility>

namespace sppo::addon {

template <class Args, class Work, class ToJs, class Settled>
class AsyncCall final : public Napi::AsyncWorker {
 public:
  AsyncCall(Napi::Env env, Args args, Work work, ToJs to_js, Settled settled)
      : Napi::AsyncWorker(env),
        deferred_(Napi::Promise::Deferred::New(env)),
        args_(std::move(args)),
        work_(std::move(work)),
        to_js_(std::move(to_js)),
        settled_(std::move(settled)) {}
  Napi::Promise promise() const { return deferred_.Promise(); }

 private:
  void Execute() override {
    try {
      work_(args_);
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override {
    settled_();
    deferred_.Resolve(to_js_(Env(), args_));
  }
  void OnError(const Napi::Error& e) override {
    settled_();
    deferred_.Reject(e.Value());
  }

  Napi::Promise::Deferred deferred_;
  Args args_;
  Work work_;
  ToJs to_js_;
  Settled settled_;
};

// Queues the call and returns its Promise; libuv owns it from here (it deletes itself).
template <class Args, class Work, class ToJs, class Settled>
Napi::Promise run_async(Napi::Env env, Args args, Work work, ToJs to_js, Settled settled) {
  auto* call = new AsyncCall<Args, Work, ToJs, Settled>(env, std::move(args), std::move(work), std::move(to_js),
                                                        std::move(settled));
  Napi::Promise promise = call->promise();
  call->Queue();
  return promise;
}

}  // namespace sppo::addon
