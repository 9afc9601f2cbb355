// The background job that rotates keys whose rotation period has passed: one thread that calls
// KeyService::rotate_due every `interval` until it is destroyed. Instances sharing a store take
// turns through a store lease held under the instance's id: one instance runs it at a time, the
// heartbeat renews it (renew_lease) so it outlives long intervals, and another instance takes
// over once the holder has missed three heartbeats (`lease_s`).
#pragma once

#include <chrono>

#include "common/time.hpp"
#include "keys/key_service.hpp"
#include "keys/periodic_job.hpp"

namespace p11kms::keys {

class RotationWorker {
 public:
  static constexpr const char* kLease = "rotation";

  RotationWorker(KeyService& keys, store::MetadataStore& store, std::chrono::milliseconds interval,
                 std::string holder, int64_t lease_s)
      : keys_(keys), store_(store), holder_(std::move(holder)), lease_s_(lease_s), job_(interval, [this] { pass(); }) {}

  // Takes or renews the lease (with the heartbeat); throws when the store is away.
  bool renew_lease() { return store_.take_lease(kLease, holder_, timefmt::now_unix(), lease_s_); }

 private:
  void pass() {
    try {
      if (renew_lease()) keys_.rotate_due(timefmt::now_unix());  // logs its own failures
    } catch (const std::exception&) {
      // The store is away: the next pass tries again.
    }
  }

  KeyService& keys_;
  store::MetadataStore& store_;
  std::string holder_;  // this instance's id
  int64_t lease_s_;
  PeriodicJob job_;     // last: its thread starts once the members it uses exist
};

}  // namespace p11kms::keys
