// Unit tests for hsm/batch_gate.hpp: one batch at a time, turns in arrival order every kSlice
// items, and a no-op scope when the gate is off.
#include "hsm/batch_gate.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

using p11kms::hsm::BatchGate;

namespace {

// Waits (bounded) until pred holds; false on timeout.
template <class Pred>
bool eventually(Pred pred) {
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::yield();
  }
  return true;
}

// Runs `items` items in one scope on `gate` (nullptr: off), tracking how many scopes are inside
// an item at once.
void run_batch(BatchGate* gate, int items, std::atomic<int>& inside, std::atomic<int>& most) {
  BatchGate::Scope scope(gate);
  for (int i = 0; i < items; ++i) {
    scope.next_item();
    int now = ++inside;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
    std::this_thread::yield();  // give the other batch every chance to overlap
    --inside;
  }
}

}  // namespace

TEST(BatchGate, LetsOneBatchInAtATime) {
  BatchGate gate;
  std::atomic<int> inside{0}, most{0};
  std::vector<std::thread> batches;
  for (int t = 0; t < 3; ++t) batches.emplace_back([&] { run_batch(&gate, 1000, inside, most); });
  for (auto& b : batches) b.join();
  EXPECT_EQ(most.load(), 1);
}

TEST(BatchGate, OffScopesRunTogether) {
  std::atomic<int> in_scope{0};
  std::atomic<bool> both{false};
  auto batch = [&] {
    BatchGate::Scope scope(nullptr);
    scope.next_item();
    ++in_scope;
    both = eventually([&] { return in_scope.load() == 2; });
  };
  std::thread a(batch), b(batch);
  a.join();
  b.join();
  EXPECT_TRUE(both.load());
}

// A batch that holds the gate lets a waiting one go after kSlice items, then carries on.
TEST(BatchGate, WaitingBatchGetsATurnAfterASlice) {
  BatchGate gate;
  std::atomic<bool> first_in{false}, second_done{false};
  int calls_until_second_done = 0;
  std::thread first([&] {
    BatchGate::Scope scope(&gate);
    first_in = true;
    ASSERT_TRUE(eventually([&] { return gate.contended(); }));
    for (int i = 1; i <= 10 * BatchGate::kSlice; ++i) {
      scope.next_item();
      if (second_done && calls_until_second_done == 0) calls_until_second_done = i;
    }
  });
  ASSERT_TRUE(eventually([&] { return first_in.load(); }));
  std::thread second([&] {
    BatchGate::Scope scope(&gate);
    scope.next_item();
    second_done = true;
  });
  second.join();
  first.join();
  // kSlice items ran in the first turn; the next call handed over and came back after the second.
  EXPECT_EQ(calls_until_second_done, BatchGate::kSlice + 1);
}

// Without a waiter nothing is handed over: the turn just goes on.
TEST(BatchGate, AloneABatchKeepsTheGate) {
  BatchGate gate;
  BatchGate::Scope scope(&gate);
  for (int i = 0; i < 3 * BatchGate::kSlice; ++i) scope.next_item();
  EXPECT_FALSE(gate.contended());
  EXPECT_EQ(scope.items_in_turn(), BatchGate::kSlice);  // the count restarts each slice
}
