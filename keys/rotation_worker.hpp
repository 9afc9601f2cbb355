// The background job that rotates keys whose rotation period has passed: one thread that calls
// KeyService::rotate_due every `interval` until it is destroyed. Instances sharing a store take
// turns through a store lease, so one instance runs it at a time and another takes over when
// the holder stops renewing (a dead instance's lease expires after three intervals).
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "common/time.hpp"
#include "common/uuid.hpp"
#include "keys/key_service.hpp"

namespace p11kms::keys {

class RotationWorker {
 public:
  RotationWorker(KeyService& keys, store::MetadataStore& store, std::chrono::milliseconds interval)
      : keys_(keys), store_(store), interval_(interval), holder_(uuid::new_v4()) {
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
      int64_t now = timefmt::now_unix();
      try {
        int64_t ttl = std::max<int64_t>(3, 3 * std::chrono::duration_cast<std::chrono::seconds>(interval_).count());
        if (store_.take_lease("rotation", holder_, now, ttl)) keys_.rotate_due(now);  // logs its own failures
      } catch (const std::exception&) {
        // The store is away: the next pass tries again.
      }
      lk.lock();
    }
  }

  KeyService& keys_;
  store::MetadataStore& store_;
  std::chrono::milliseconds interval_;
  std::string holder_;  // this instance, for the lease
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace p11kms::keys
