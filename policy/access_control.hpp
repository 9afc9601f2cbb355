// Who may do what, as one immutable snapshot (tokens + policies) that a config reload replaces
// atomically: a request sees either the old rules or the new ones, never a mix.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "policy/policy.hpp"
#include "policy/token_auth.hpp"

namespace p11kms::policy {

struct AccessRules {
  AccessRules(std::vector<TokenEntry> tokens, const std::map<std::string, Policy>& policies)
      : authenticator(std::move(tokens)), policies(policies) {}
  TokenAuthenticator authenticator;
  PolicySet policies;
};

class AccessControl {
 public:
  explicit AccessControl(std::shared_ptr<const AccessRules> rules) : rules_(std::move(rules)) {}
  std::shared_ptr<const AccessRules> current() const {
    std::lock_guard<std::mutex> lk(mu_);
    return rules_;
  }
  void replace(std::shared_ptr<const AccessRules> rules) {
    std::lock_guard<std::mutex> lk(mu_);
    rules_ = std::move(rules);
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const AccessRules> rules_;
};

}  // namespace p11kms::policy
