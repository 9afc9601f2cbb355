// A background job: one thread that runs `work` every `interval` until the job is destroyed
// (which wakes it, stops it and joins it). The work logs and survives its own failures.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

namespace p11kms::keys {

class PeriodicJob {
 public:
  PeriodicJob(std::chrono::milliseconds interval, std::function<void()> work)
      : interval_(interval), work_(std::move(work)) {
    thread_ = std::thread([this] { run(); });
  }
  PeriodicJob(const PeriodicJob&) = delete;
  PeriodicJob& operator=(const PeriodicJob&) = delete;
  ~PeriodicJob() {
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
      work_();
      lk.lock();
    }
  }

  std::chrono::milliseconds interval_;
  std::function<void()> work_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;  // last: started once everything it uses exists
};

}  // namespace p11kms::keys
