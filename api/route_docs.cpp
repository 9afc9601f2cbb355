// Markdown reference generated from the route declarations, so docs/api/routes.md says exactly
// what the server accepts (a test fails when the two differ).
#include <sstream>

#include "api/api_service.hpp"

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

}  // namespace

std::string render_route_docs(const Router& router, const std::string& mount, const std::string& prefix) {
  std::ostringstream out;
  for (const auto& r : router.routes()) {
    if (r.pattern.rfind(prefix, 0) != 0) continue;
    out << "### `" << r.method << " " << mount << r.pattern << "`\n\n" << r.summary << "\n";
    if (!r.authenticated) out << "No token needed.\n";
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
