#include "hsm/batch_gate.hpp"

namespace p11kms::hsm {

void BatchGate::enter() {
  std::unique_lock<std::mutex> lk(mu_);
  uint64_t ticket = next_ticket_++;
  turn_.wait(lk, [&] { return serving_ == ticket; });
}

void BatchGate::leave() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++serving_;
  }
  turn_.notify_all();
}

bool BatchGate::contended() {
  std::lock_guard<std::mutex> lk(mu_);
  return next_ticket_ - serving_ > 1;
}

void BatchGate::Scope::next_item() {
  if (!gate_) return;
  if (++in_turn_ <= kSlice) return;
  if (gate_->contended()) {
    gate_->leave();
    gate_->enter();
  }
  in_turn_ = 1;
}

}  // namespace p11kms::hsm
