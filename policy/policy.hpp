// Path policies with Vault's semantics: rules on paths (a trailing `*` is a prefix match, `+`
// matches exactly one segment), capabilities create/read/update/delete/list/sudo/deny, deny
// wins, and the most specific matching path decides (Vault's priority rules).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace p11kms::policy {

enum Capability : uint32_t {
  kCreate = 1u << 0,
  kRead = 1u << 1,
  kUpdate = 1u << 2,
  kDelete = 1u << 3,
  kList = 1u << 4,
  kSudo = 1u << 5,
  kDeny = 1u << 6,
};
using Capabilities = uint32_t;

std::optional<Capability> parse_capability(const std::string& name);
const char* capability_name(Capability c);

struct PathRule {
  std::string path;  // e.g. "transit/encrypt/app-*", "transit/keys/+"
  Capabilities capabilities = 0;
};

struct Policy {
  std::string name;
  std::vector<PathRule> rules;
};

// Built-in policies: root (everything) and the KMS roles kms-viewer, kms-editor, kms-admin.
const std::map<std::string, Policy>& builtin_policies();
bool is_builtin_policy(const std::string& name);

// A set of named policies (built-ins plus configured ones) that answers access questions.
class PolicySet {
 public:
  PolicySet();  // built-ins only
  explicit PolicySet(const std::map<std::string, Policy>& configured);

  bool has(const std::string& name) const { return policies_.count(name) != 0; }
  // May a token holding `policies` use `capability` on `path`?
  bool allows(const std::vector<std::string>& policies, const std::string& path, Capability capability) const;

 private:
  std::map<std::string, Policy> policies_;
};

// True if the rule path (with + and a trailing *) matches the request path.
bool path_matches(const std::string& rule, const std::string& path);
// Vault's priority between two matching rule paths: true if a is lower priority than b.
bool lower_priority(const std::string& a, const std::string& b);

}  // namespace p11kms::policy
