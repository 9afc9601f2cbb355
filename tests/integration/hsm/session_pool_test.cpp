// SessionPool::Lease::refresh_view and the token lookups that use it, against a real SoftHSM
// token. (That another process's object becomes visible is shown end to end by
// tests/integration/test_shared_token_visibility.py, which needs two processes.)
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "hsm/token.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

class RefreshTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token ops_{pool_};
};

bool session_works(hsm::SessionPool::Lease& l) {
  uint8_t b[8];
  return l.fn()->C_GenerateRandom(l.session(), b, sizeof b) == CKR_OK;
}

// The module is re-opened only once every other lease has come back, and the caller's lease
// then holds a working session of the new generation.
TEST_F(RefreshTest, WaitsForLeasesInFlightThenMovesTheLeaseToTheNewGeneration) {
  auto id = ops_.new_object_id();
  ops_.generate_aes_key(id, 32, "p11kms/root/refresh/v1");
  std::atomic<bool> holder_has_lease{false}, holder_released{false};
  std::thread holder([&] {
    auto l = pool_.lease();
    holder_has_lease = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    holder_released = true;
  });
  while (!holder_has_lease) std::this_thread::yield();
  uint64_t before = pool_.generation();
  {
    auto l = pool_.lease();
    l.refresh_view();
    EXPECT_TRUE(holder_released.load());
    EXPECT_EQ(l.generation(), before + 1);
    EXPECT_TRUE(session_works(l));
  }
  holder.join();
  // Objects made before are still there, through new handles.
  EXPECT_TRUE(ops_.exists(id));
  auto ct = ops_.aes_gcm_encrypt(id, hsm::Bytes(12, 1), {}, reinterpret_cast<const uint8_t*>("abc"), 3);
  EXPECT_EQ(ct.size(), 3u + 16u);
}

// A thread that already holds a lease may take another while a refresh waits (unsealing inside
// an operation does): it is not made to wait for the refresh that waits for it.
TEST_F(RefreshTest, ANestedLeaseIsNotBlockedByAWaitingRefresh) {
  std::atomic<bool> outer_taken{false}, nested_ok{false};
  std::thread worker([&] {
    auto outer = pool_.lease();
    outer_taken = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let the refresh start waiting
    auto nested = pool_.lease();
    nested_ok = session_works(nested);
  });
  while (!outer_taken) std::this_thread::yield();
  uint64_t before = pool_.generation();
  {
    auto l = pool_.lease();
    l.refresh_view();
    EXPECT_EQ(l.generation(), before + 1);  // it did happen, after the worker's leases came back
  }
  worker.join();
  EXPECT_TRUE(nested_ok.load());
}

// Lookups of an id the token does not have re-read the token once, then trust the answer for a
// while; an object this process made is never searched for that way.
TEST_F(RefreshTest, AMissingObjectCostsOneRefreshNotOnePerLookup) {
  auto missing = ops_.new_object_id();
  uint64_t g0 = pool_.generation();
  EXPECT_FALSE(ops_.exists(missing));
  EXPECT_EQ(pool_.generation(), g0 + 1);
  EXPECT_FALSE(ops_.exists(missing));
  EXPECT_THROW(ops_.aes_gcm_encrypt(missing, hsm::Bytes(12, 1), {}, reinterpret_cast<const uint8_t*>("a"), 1),
               hsm::ObjectMissing);
  EXPECT_FALSE(ops_.destroy(missing));
  EXPECT_EQ(pool_.generation(), g0 + 1);
  EXPECT_FALSE(ops_.destroy_own(ops_.new_object_id()));
  EXPECT_EQ(pool_.generation(), g0 + 1);
  EXPECT_FALSE(ops_.destroy(ops_.new_object_id()));  // another id: one more re-read
  EXPECT_EQ(pool_.generation(), g0 + 2);
}

}  // namespace
