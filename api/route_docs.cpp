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

}  // namespace

static std::string route_line(const Dialect& d, const Route& r) {
  return r.method + " " + d.mount + r.pattern + (r.action.empty() ? "" : "?action=" + r.action);
}

std::string render_policy_table(const Dialect& d) {
  std::ostringstream out;
  out << "| route | policy path | capability |\n|---|---|---|\n";
  for (const auto& r : d.router.routes()) {
    out << "| `" << route_line(d, r) << "` | ";
    if (!r.authenticated)
      out << "(none) | no token needed |\n";
    else
      out << "`" << d.policy_pattern(r) << "` | " << capability_words(r.capability) << " |\n";
  }
  return out.str();
}

std::string render_route_docs(const Dialect& d, const std::string& prefix) {
  std::ostringstream out;
  for (const auto& r : d.router.routes()) {
    if (r.pattern.rfind(prefix, 0) != 0) continue;
    out << "### `" << route_line(d, r) << "`\n\n" << r.summary << "\n";
    if (!r.authenticated)
      out << "No token needed.\n";
    else
      out << "Policy: " << capability_words(r.capability) << " on `" << d.policy_pattern(r) << "`.\n";
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
