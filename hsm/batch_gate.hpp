// The token's batch gate: lets one batch of operations at a time into a module that serializes
// its calls inside a process anyway (SoftHSM: TokenOptions::serialize_batches), and hands the
// module on in arrival order every kSlice items, so two batches take turns.
//
// Why: two threads running batches into SoftHSM 2.6.1 meet on its process-wide locks (the
// handle table, the secure-memory registry, the key that protects private objects) on nearly
// every call, and each meeting is a futex sleep and wake-up: ~1 context switch per item,
// measured (docs/PERFORMANCE.md section 9). Behind the gate they meet once per slice. Single
// operations do not take it: for one operation per request a wait at the gate costs as much as
// a meeting inside the module (measured, no gain).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace p11kms::hsm {

class BatchGate {
 public:
  static constexpr int kSlice = 128;  // items a batch runs before a waiting batch goes first

  // Waits for this caller's turn (first come, first served).
  void enter();
  void leave();
  // Whether another batch is waiting for its turn.
  bool contended();

  // Holds the gate for one batch, if it is on; a no-op scope otherwise.
  class Scope {
   public:
    explicit Scope(BatchGate* gate) : gate_(gate) {
      if (gate_) gate_->enter();
    }
    ~Scope() {
      if (gate_) gate_->leave();
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    // Call before each item: every kSlice items a waiting batch gets its turn first.
    void next_item();
    // Items run since this scope last (re)entered the gate (for tests).
    int items_in_turn() const { return in_turn_; }

   private:
    BatchGate* gate_;
    int in_turn_ = 0;
  };

 private:
  std::mutex mu_;
  std::condition_variable turn_;
  uint64_t next_ticket_ = 0;  // the ticket the next caller draws
  uint64_t serving_ = 0;      // the ticket that holds the gate
};

}  // namespace p11kms::hsm
