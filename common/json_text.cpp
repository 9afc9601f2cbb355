#include "common/json_text.hpp"

#include <charconv>

namespace p11kms::json_text {
namespace {

using json = nlohmann::json;

std::string nlohmann_dump(const json& value) { return value.dump(-1, ' ', false, json::error_handler_t::replace); }

bool copies_verbatim(const std::string& s) {
  for (unsigned char c : s)
    if (c < 0x20 || c >= 0x80 || c == '"' || c == '\\') return false;
  return true;
}

void append_string(std::string& out, const std::string& s) {
  if (copies_verbatim(s)) {
    out += '"';
    out += s;
    out += '"';
  } else {
    out += nlohmann_dump(json(s));
  }
}

template <typename Int>
void append_integer(std::string& out, Int v) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, end);
}

}  // namespace

void append(std::string& out, const json& value) {
  switch (value.type()) {
    case json::value_t::object: {
      out += '{';
      bool first = true;
      for (auto it = value.begin(); it != value.end(); ++it) {
        if (!first) out += ',';
        first = false;
        append_string(out, it.key());
        out += ':';
        append(out, *it);
      }
      out += '}';
      return;
    }
    case json::value_t::array: {
      out += '[';
      bool first = true;
      for (const auto& v : value) {
        if (!first) out += ',';
        first = false;
        append(out, v);
      }
      out += ']';
      return;
    }
    case json::value_t::string:
      append_string(out, value.get_ref<const std::string&>());
      return;
    case json::value_t::number_integer:
      append_integer(out, value.get<json::number_integer_t>());
      return;
    case json::value_t::number_unsigned:
      append_integer(out, value.get<json::number_unsigned_t>());
      return;
    default:  // null, booleans, floats (nlohmann's shortest round-trip form), binary
      out += nlohmann_dump(value);
      return;
  }
}

std::string dump(const json& value) {
  std::string out;
  append(out, value);
  return out;
}

}  // namespace p11kms::json_text
