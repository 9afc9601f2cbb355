// A throwaway SoftHSM token in a fresh temp dir, for integration tests. No mocks: this is the
// real module with its own softhsm2.conf, removed with the directory afterwards.
#pragma once

#include <string>

#include "hsm/session_pool.hpp"

namespace p11kms::test_support {

class TempToken {
 public:
  explicit TempToken(const std::string& label = "p11kms-test");
  ~TempToken();
  TempToken(const TempToken&) = delete;
  TempToken& operator=(const TempToken&) = delete;

  const std::string& dir() const { return dir_; }
  const std::string& label() const { return label_; }
  static constexpr const char* kModule = "/usr/lib/softhsm/libsofthsm2.so";
  static constexpr const char* kUserPin = "1234";
  static constexpr const char* kSoPin = "5678";
  hsm::PoolConfig pool_config(size_t sessions = 4) const;
  // The token's directory moved away (SoftHSM then finds no token: an outage) and back.
  void take_away();
  void bring_back();

 private:
  std::string dir_;
  std::string label_;
};

// mkdtemp under $TMPDIR or /tmp; removed recursively by remove_tree.
std::string make_temp_dir(const std::string& prefix);
void remove_tree(const std::string& dir);

}  // namespace p11kms::test_support
