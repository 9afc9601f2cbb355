// The background job that rotates keys whose rotation period has passed: one thread that calls
// KeyService::rotate_due every `interval` until it is destroyed.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "common/time.hpp"
#include "keys/key_service.hpp"

namespace p11kms::keys {

class RotationWorker {
 public:
  RotationWorker(KeyService& keys, std::chrono::milliseconds interval) : keys_(keys), interval_(interval) {
    thread_ = std::thread([this] { run(); });
  }
  RotationWorker(const RotationWorker&) = delete;
  RotationWorker& operator=(const RotationWorker&) = delete;
  ~RotationWorker() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lk(mu_);
    while (!cv_.wait_for(lk, interval_, [this] { return stop_; })) {
      lk.unlock();
      keys_.rotate_due(timefmt::now_unix());  // logs and survives its own failures
      lk.lock();
    }
  }

  KeyService& keys_;
  std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace p11kms::keys
