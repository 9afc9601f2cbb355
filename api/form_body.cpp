#include "api/form_body.hpp"

#include <openssl/crypto.h>
#include <strings.h>

#include "api/api_service.hpp"
#include "keys/errors.hpp"

namespace p11kms::api {
namespace {

using json = nlohmann::json;

[[noreturn]] void bad(const std::string& why) { throw keys::invalid("cannot parse the form body: " + why); }

int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string percent_decode(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c == '+') {
      out += ' ';
    } else if (c == '%') {
      int hi = i + 2 < s.size() ? hexval(s[i + 1]) : -1, lo = i + 2 < s.size() ? hexval(s[i + 2]) : -1;
      if (hi < 0 || lo < 0) bad("a bad percent escape");
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += c;
    }
  }
  return out;
}

// Puts one form field into the object: "a.b" nests, "a[]" / "a[N]" appends, a repeated name
// becomes an array.
void put_field(json& root, const std::string& raw_name, std::string value, size_t& count) {
  if (++count > kMaxFormFields) bad("more than " + std::to_string(kMaxFormFields) + " fields");
  if (raw_name.empty() || raw_name.size() > 128) bad("a field name is empty or longer than 128 characters");
  std::string name = raw_name;
  bool array = false;
  size_t br = name.find('[');
  if (br != std::string::npos) {
    if (name.back() != ']') bad("bad field name \"" + raw_name + "\"");
    std::string idx = name.substr(br + 1, name.size() - br - 2);
    if (idx.find_first_not_of("0123456789") != std::string::npos) bad("bad field name \"" + raw_name + "\"");
    name = name.substr(0, br);
    array = true;
  }
  std::vector<std::string> path;
  size_t start = 0;
  while (true) {
    size_t dot = name.find('.', start);
    path.push_back(name.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (path.back().empty()) bad("bad field name \"" + raw_name + "\"");
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  if (path.size() > 4) bad("field name \"" + raw_name + "\" nests deeper than 4 levels");
  json* node = &root;
  for (size_t i = 0; i + 1 < path.size(); ++i) {
    json& next = (*node)[path[i]];
    if (next.is_null()) next = json::object();
    if (!next.is_object()) bad("field \"" + raw_name + "\" conflicts with another field");
    node = &next;
  }
  json& slot = (*node)[path.back()];
  if (array) {
    if (slot.is_null()) slot = json::array();
    if (!slot.is_array()) bad("field \"" + raw_name + "\" conflicts with another field");
    slot.push_back(std::move(value));
  } else if (slot.is_null()) {
    slot = std::move(value);
  } else if (slot.is_string()) {
    slot = json::array({slot, std::move(value)});
  } else if (slot.is_array()) {
    slot.push_back(std::move(value));
  } else {
    bad("field \"" + raw_name + "\" conflicts with another field");
  }
}

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.pop_back();
  size_t i = s.find_first_not_of(" \t");
  return i == std::string::npos ? std::string() : s.substr(i);
}

// A parameter of a header value: name="value" or name=value.
std::optional<std::string> header_param(const std::string& header, const std::string& param) {
  size_t pos = 0;
  while ((pos = header.find(';', pos)) != std::string::npos) {
    ++pos;
    size_t eq = header.find('=', pos);
    if (eq == std::string::npos) return std::nullopt;
    std::string key = trim(header.substr(pos, eq - pos));
    size_t vstart = eq + 1;
    std::string value;
    if (vstart < header.size() && header[vstart] == '"') {
      size_t end = header.find('"', vstart + 1);
      if (end == std::string::npos) return std::nullopt;
      value = header.substr(vstart + 1, end - vstart - 1);
      pos = end + 1;
    } else {
      size_t end = header.find(';', vstart);
      value = trim(header.substr(vstart, end == std::string::npos ? std::string::npos : end - vstart));
      pos = end == std::string::npos ? header.size() : end;
    }
    if (strcasecmp(key.c_str(), param.c_str()) == 0) return value;
    if (pos >= header.size()) break;
  }
  return std::nullopt;
}

}  // namespace

json parse_urlencoded_form(const std::string& body) {
  json root = json::object();
  size_t count = 0, start = 0;
  while (start <= body.size()) {
    size_t amp = body.find('&', start);
    std::string pair = body.substr(start, amp == std::string::npos ? std::string::npos : amp - start);
    if (!pair.empty() && pair.find_first_not_of("\r\n") != std::string::npos) {
      size_t eq = pair.find('=');
      std::string name = percent_decode(pair.substr(0, eq));
      std::string value = eq == std::string::npos ? std::string() : percent_decode(pair.substr(eq + 1));
      OPENSSL_cleanse(pair.data(), pair.size());
      put_field(root, name, std::move(value), count);
    }
    if (amp == std::string::npos) break;
    start = amp + 1;
  }
  return root;
}

json parse_multipart_form(const std::string& body, const std::string& boundary) {
  if (boundary.empty() || boundary.size() > 70) bad("a multipart body needs a boundary of 1 to 70 characters");
  json root = json::object();
  size_t count = 0;
  const std::string delim = "--" + boundary;
  size_t pos = body.find(delim);
  if (pos == std::string::npos) bad("the multipart boundary is missing");
  while (true) {
    pos += delim.size();
    if (body.compare(pos, 2, "--") == 0) break;  // the closing delimiter
    if (body.compare(pos, 2, "\r\n") != 0) bad("a malformed multipart delimiter");
    pos += 2;
    size_t headers_end = body.find("\r\n\r\n", pos);
    if (headers_end == std::string::npos) bad("a multipart part without headers");
    std::string headers = body.substr(pos, headers_end - pos);
    size_t content_start = headers_end + 4;
    size_t next = body.find("\r\n" + delim, content_start);
    if (next == std::string::npos) bad("a multipart part is not terminated");
    std::optional<std::string> name;
    size_t hpos = 0;
    while (hpos <= headers.size()) {
      size_t eol = headers.find("\r\n", hpos);
      std::string line = headers.substr(hpos, eol == std::string::npos ? std::string::npos : eol - hpos);
      size_t colon = line.find(':');
      if (colon != std::string::npos &&
          strcasecmp(trim(line.substr(0, colon)).c_str(), "Content-Disposition") == 0)
        name = header_param(line.substr(colon + 1), "name");
      if (eol == std::string::npos) break;
      hpos = eol + 2;
    }
    if (!name) bad("a multipart part has no Content-Disposition name");
    put_field(root, *name, body.substr(content_start, next - content_start), count);
    pos = next + 2;
  }
  return root;
}

json parse_kong_body(const http::Request& request, size_t max_json_depth) {
  bool has_body = request.body.find_first_not_of(" \t\r\n") != std::string::npos;
  if (!has_body) return json::object();
  std::string type = request.header("Content-Type").value_or("");
  std::string media = trim(type.substr(0, type.find(';')));
  if (strcasecmp(media.c_str(), "application/x-www-form-urlencoded") == 0) return parse_urlencoded_form(request.body);
  if (strcasecmp(media.c_str(), "multipart/form-data") == 0)
    return parse_multipart_form(request.body, header_param(type, "boundary").value_or(""));
  json values = parse_body(request.body, max_json_depth);
  if (!values.is_object()) throw keys::invalid("the request body must be a JSON object");
  return values;
}

}  // namespace p11kms::api
