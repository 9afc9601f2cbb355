// Markdown references generated from the route declarations (docs/api/routes.md and the table
// in docs/api/policy.md), so the docs say exactly what the server does; tests fail on drift.
#include <sstream>

#include "api/api_service.hpp"
#include "policy/policy.hpp"

namespace p11kms::api {
namespace {

const char* type_word(FieldType t) {
  switch (t) {
    case FieldType::string: return "string";
    case FieldType::integer: return "integer";
    case FieldType::boolean: return "boolean";
    case FieldType::array: return "array";
    default: return "object";
  }
}

std::string capability_words(policy::Capabilities caps) {
  if (caps == 0) return "any valid token";
  std::string out;
  for (auto c : {policy::kCreate, policy::kRead, policy::kUpdate, policy::kDelete, policy::kList, policy::kSudo,
                 policy::kDeny})
    if (caps & c) out += (out.empty() ? "" : ", ") + std::string(policy::capability_name(c));
  return out;
}

// Policy path of a route: its pattern with each :param shown as <param>.
std::string policy_path(const std::string& pattern) {
  std::string out;
  size_t i = 0;
  while (i < pattern.size()) {
    if (pattern[i] == ':' && (i == 0 || pattern[i - 1] == '/')) {
      size_t end = pattern.find('/', i);
      if (end == std::string::npos) end = pattern.size();
      out += "<" + pattern.substr(i + 1, end - i - 1) + ">";
      i = end;
    } else {
      out += pattern[i++];
    }
  }
  return out;
}

}  // namespace

std::string render_policy_table(const Router& router, const std::string& mount) {
  std::ostringstream out;
  out << "| route | policy path | capability |\n|---|---|---|\n";
  for (const auto& r : router.routes()) {
    out << "| `" << r.method << " " << mount << r.pattern << "` | ";
    if (!r.authenticated)
      out << "(none) | no token needed |\n";
    else
      out << "`" << policy_path(r.pattern) << "` | " << capability_words(r.capability) << " |\n";
  }
  return out.str();
}

std::string render_route_docs(const Router& router, const std::string& mount, const std::string& prefix) {
  std::ostringstream out;
  for (const auto& r : router.routes()) {
    if (r.pattern.rfind(prefix, 0) != 0) continue;
    out << "### `" << r.method << " " << mount << r.pattern << "`\n\n" << r.summary << "\n";
    if (!r.authenticated)
      out << "No token needed.\n";
    else
      out << "Policy: " << capability_words(r.capability) << " on `" << policy_path(r.pattern) << "`.\n";
    std::vector<const Field*> body;
    for (const auto& f : r.fields)
      if (r.pattern.find(":" + f.name) == std::string::npos) body.push_back(&f);
    if (!body.empty()) {
      out << "\n| field | type | default | description |\n|---|---|---|---|\n";
      for (const Field* f : body)
        out << "| `" << f->name << "` | " << type_word(f->type) << " | "
            << (f->default_value.is_null() ? std::string() : "`" + f->default_value.dump() + "`") << " | "
            << f->description << " |\n";
    }
    out << "\n";
  }
  return out.str();
}

}  // namespace p11kms::api
