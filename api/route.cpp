#include "api/route.hpp"

#include <cmath>
#include <string_view>

#include "keys/errors.hpp"

namespace p11kms::api {
namespace {

// The segments between '/' (empty ones kept: "a//b" has three, "/a" two).
template <typename Segments>
void split_path(std::string_view path, Segments& out) {
  size_t start = 0;
  while (start <= path.size()) {
    size_t slash = path.find('/', start);
    if (slash == std::string_view::npos) slash = path.size();
    out.emplace_back(path.substr(start, slash - start));
    start = slash + 1;
  }
}

// ":name" matches any non-empty segment, anything else itself.
bool segments_match(const std::vector<std::string>& pattern, const std::vector<std::string_view>& path) {
  if (pattern.size() != path.size()) return false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const std::string& p = pattern[i];
    if (!p.empty() && p[0] == ':') {
      if (path[i].empty()) return false;
    } else if (p != path[i]) {
      return false;
    }
  }
  return true;
}

std::map<std::string, std::string> params_of(const std::vector<std::string>& pattern,
                                             const std::vector<std::string_view>& path) {
  std::map<std::string, std::string> params;
  for (size_t i = 0; i < pattern.size(); ++i)
    if (!pattern[i].empty() && pattern[i][0] == ':') params[pattern[i].substr(1)] = std::string(path[i]);
  return params;
}

}  // namespace

const char* field_type_name(FieldType t) {
  switch (t) {
    case FieldType::string: return "a string";
    case FieldType::integer: return "an integer";
    case FieldType::boolean: return "a boolean";
    case FieldType::array: return "an array";
    default: return "an object";
  }
}

void Router::add(Route route) {
  std::vector<std::string> segments;
  split_path(route.pattern, segments);
  segments_.push_back(std::move(segments));
  routes_.push_back(std::move(route));
}

Router::Match Router::match(const std::string& method, const std::string& path, const std::string& action) const {
  Match m;
  std::vector<std::string_view> segments;
  segments.reserve(8);
  split_path(path, segments);
  for (size_t i = 0; i < routes_.size(); ++i) {
    const Route& r = routes_[i];
    if (!segments_match(segments_[i], segments)) continue;
    if (r.method != method) {
      if (m.outcome == Outcome::not_found) m.outcome = Outcome::method_not_allowed;
      continue;
    }
    if (r.action == action) {
      m.outcome = Outcome::found;
      m.route = &r;
      m.params = params_of(segments_[i], segments);
      m.actions.clear();
      return m;
    }
    if (!r.action.empty()) m.actions.push_back(r.action);
    m.outcome = Outcome::unknown_action;
  }
  return m;
}

const Field& FieldData::field(const std::string& name) const {
  if (schema_)
    for (const auto& f : *schema_)
      if (f.name == name) return f;
  throw keys::KeyError(keys::ErrorKind::internal, "internal", "undeclared field " + name);
}

const json* FieldData::value(const std::string& name) const {
  auto it = raw().find(name);
  if (it != raw().end() && !it->is_null()) return &*it;
  const auto& d = field(name).default_value;
  return d.is_null() ? nullptr : &d;
}

bool FieldData::has(const std::string& name) const {
  auto it = raw().find(name);
  return it != raw().end() && !it->is_null();
}

std::string FieldData::get_string(const std::string& name) const {
  const json* v = value(name);
  if (!v) return {};
  if (v->is_string()) return v->get<std::string>();
  if (v->is_number_integer()) return std::to_string(v->get<int64_t>());
  throw keys::invalid("field \"" + name + "\" must be " + field_type_name(FieldType::string));
}

int64_t FieldData::get_int(const std::string& name) const {
  const json* v = value(name);
  if (!v) return 0;
  if (v->is_number_integer()) return v->get<int64_t>();
  if (v->is_number_float()) {
    // Range first: casting an out-of-range double to an integer is undefined (found by the
    // fuzzer under UBSan with 1e300).
    double d = v->get<double>();
    if (d >= -9.0e18 && d <= 9.0e18 && d == std::floor(d)) return static_cast<int64_t>(d);
  }
  if (v->is_string()) {
    const auto& s = v->get_ref<const std::string&>();
    try {
      size_t used = 0;
      long long n = std::stoll(s, &used, 10);
      if (used == s.size()) return n;
    } catch (const std::exception&) {
    }
  }
  throw keys::invalid("field \"" + name + "\" must be " + field_type_name(FieldType::integer));
}

bool FieldData::get_bool(const std::string& name) const {
  const json* v = value(name);
  if (!v) return false;
  if (v->is_boolean()) return v->get<bool>();
  if (v->is_number_integer()) {
    auto n = v->get<int64_t>();
    if (n == 0 || n == 1) return n == 1;
  }
  if (v->is_string()) {
    const auto& s = v->get_ref<const std::string&>();
    if (s == "true" || s == "1" || s == "t" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "0" || s == "f" || s == "False" || s == "FALSE") return false;
  }
  throw keys::invalid("field \"" + name + "\" must be " + field_type_name(FieldType::boolean));
}

const json& FieldData::get_array(const std::string& name) const {
  static const json empty = json::array();
  const json* v = value(name);
  if (!v) return empty;
  if (!v->is_array()) throw keys::invalid("field \"" + name + "\" must be " + field_type_name(FieldType::array));
  return *v;
}

std::vector<std::string> FieldData::unknown_fields() const {
  std::vector<std::string> out;
  const json& values = raw();
  if (!values.is_object()) return out;
  for (auto it = values.begin(); it != values.end(); ++it) {
    bool known = false;
    if (schema_)
      for (const auto& f : *schema_) known = known || f.name == it.key();
    if (!known) out.push_back(it.key());
  }
  return out;
}

}  // namespace p11kms::api
