// The background job that rotates keys whose rotation period has passed: one thread that calls
// KeyService::rotate_due every `interval` until it is destroyed. Instances sharing a store take
// turns through a store lease, so one instance runs it at a time and another takes over when
// the holder stops renewing (a dead instance's lease expires after three intervals).
#pragma once

#include <algorithm>
#include <chrono>

#include "common/time.hpp"
#include "common/uuid.hpp"
#include "keys/key_service.hpp"
#include "keys/periodic_job.hpp"

namespace p11kms::keys {

class RotationWorker {
 public:
  RotationWorker(KeyService& keys, store::MetadataStore& store, std::chrono::milliseconds interval)
      : keys_(keys), store_(store), interval_(interval), holder_(uuid::new_v4()), job_(interval, [this] { pass(); }) {}

 private:
  void pass() {
    int64_t now = timefmt::now_unix();
    try {
      int64_t ttl = std::max<int64_t>(3, 3 * std::chrono::duration_cast<std::chrono::seconds>(interval_).count());
      if (store_.take_lease("rotation", holder_, now, ttl)) keys_.rotate_due(now);  // logs its own failures
    } catch (const std::exception&) {
      // The store is away: the next pass tries again.
    }
  }

  KeyService& keys_;
  store::MetadataStore& store_;
  std::chrono::milliseconds interval_;
  std::string holder_;  // this instance, for the lease
  PeriodicJob job_;     // last: its thread starts once the members it uses exist
};

}  // namespace p11kms::keys
