#include "policy/policy.hpp"

#include <algorithm>

namespace p11kms::policy {
namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t slash = s.find('/', start);
    out.push_back(s.substr(start, slash == std::string::npos ? std::string::npos : slash - start));
    if (slash == std::string::npos) return out;
    start = slash + 1;
  }
}

size_t first_wildcard(const std::string& p) {
  size_t plus = std::string::npos;
  auto segs = split(p);
  size_t pos = 0;
  for (const auto& seg : segs) {
    if (seg == "+") {
      plus = pos;
      break;
    }
    pos += seg.size() + 1;
  }
  size_t star = (!p.empty() && p.back() == '*') ? p.size() - 1 : std::string::npos;
  return std::min(plus, star);
}

size_t plus_count(const std::string& p) {
  size_t n = 0;
  for (const auto& seg : split(p)) n += seg == "+";
  return n;
}

Policy make(const std::string& name, std::vector<PathRule> rules) { return Policy{name, std::move(rules)}; }

}  // namespace

std::optional<Capability> parse_capability(const std::string& n) {
  if (n == "create") return kCreate;
  if (n == "read") return kRead;
  if (n == "update") return kUpdate;
  if (n == "delete") return kDelete;
  if (n == "list") return kList;
  if (n == "sudo") return kSudo;
  if (n == "deny") return kDeny;
  return std::nullopt;
}

const char* capability_name(Capability c) {
  switch (c) {
    case kCreate: return "create";
    case kRead: return "read";
    case kUpdate: return "update";
    case kDelete: return "delete";
    case kList: return "list";
    case kSudo: return "sudo";
    default: return "deny";
  }
}

bool path_matches(const std::string& rule, const std::string& path) {
  bool prefix = !rule.empty() && rule.back() == '*';
  std::string body = prefix ? rule.substr(0, rule.size() - 1) : rule;
  auto r = split(body), p = split(path);
  if (!prefix && r.size() != p.size()) return false;
  if (prefix && p.size() < r.size()) return false;
  for (size_t i = 0; i < r.size(); ++i) {
    bool last = i + 1 == r.size();
    if (r[i] == "+") {
      if (p[i].empty()) return false;
      continue;
    }
    if (last && prefix) return p[i].compare(0, r[i].size(), r[i]) == 0;
    if (r[i] != p[i]) return false;
  }
  return true;
}

bool lower_priority(const std::string& a, const std::string& b) {
  // Vault's rules, in order: the earlier first wildcard loses; a trailing * loses to none; more
  // + segments lose; the shorter path loses; the lexicographically smaller path loses.
  size_t wa = first_wildcard(a), wb = first_wildcard(b);
  if (wa != wb) return wa < wb;
  bool sa = !a.empty() && a.back() == '*', sb = !b.empty() && b.back() == '*';
  if (sa != sb) return sa;
  size_t pa = plus_count(a), pb = plus_count(b);
  if (pa != pb) return pa > pb;
  if (a.size() != b.size()) return a.size() < b.size();
  return a < b;
}

const std::map<std::string, Policy>& builtin_policies() {
  // The KMS roles of Key Protect's documentation, on the kms/ policy paths.
  static const std::map<std::string, Policy> builtins = [] {
    std::vector<PathRule> viewer = {{"kms/keys/+/wrap", kUpdate}, {"kms/keys/+/unwrap", kUpdate},
                                    {"kms/keys/+/rewrap", kUpdate}};
    std::vector<PathRule> editor = viewer;
    editor.push_back({"kms/keys", kCreate | kList});
    editor.push_back({"kms/keys/+", kRead});
    std::vector<PathRule> admin = editor;
    admin.push_back({"kms/keys/+", kRead | kDelete});
    for (const char* action : {"rotate", "enable", "disable", "restore", "setKeyForDeletion", "unsetKeyForDeletion",
                               "aliases", "policies"})
      admin.push_back({std::string("kms/keys/+/") + action, kUpdate});
    std::map<std::string, Policy> m;
    m["root"] = make("root", {{"*", kCreate | kRead | kUpdate | kDelete | kList | kSudo}});
    m["kms-viewer"] = make("kms-viewer", viewer);
    m["kms-editor"] = make("kms-editor", editor);
    m["kms-admin"] = make("kms-admin", admin);
    return m;
  }();
  return builtins;
}

bool is_builtin_policy(const std::string& name) { return builtin_policies().count(name) != 0; }

PolicySet::PolicySet() : policies_(builtin_policies()) {}

PolicySet::PolicySet(const std::map<std::string, Policy>& configured) : policies_(builtin_policies()) {
  for (const auto& [name, p] : configured) policies_[name] = p;
}

bool PolicySet::allows(const std::vector<std::string>& names, const std::string& path, Capability cap) const {
  // Rules on the same path string are merged across the token's policies; the most specific
  // matching path then decides, and deny on it wins.
  std::map<std::string, Capabilities> merged;
  for (const auto& n : names) {
    auto it = policies_.find(n);
    if (it == policies_.end()) continue;
    for (const auto& rule : it->second.rules)
      if (path_matches(rule.path, path)) merged[rule.path] |= rule.capabilities;
  }
  if (merged.empty()) return false;
  auto best = merged.begin();
  for (auto it = merged.begin(); it != merged.end(); ++it)
    if (lower_priority(best->first, it->first)) best = it;
  if (best->second & kDeny) return false;
  return (best->second & cap) != 0;
}

}  // namespace p11kms::policy
