// Fuzz target: request-body parsing of every transit route that takes a body, without a token.
// It does what ApiService::handle does with a body before the route's callback runs, then
// what the callbacks do with the fields: parse_body (with the depth limit), URL parameters
// merged over the body, FieldData over the route's own declared fields (from
// add_transit_routes, so it follows the real declarations), every typed getter on every
// field, batch_input items as FieldData over the item fields, base64 and ciphertext decoding
// of the fields that carry them, unknown_fields. Fast (no PKCS#11); the transit_request
// target drives the real ApiService over a SoftHSM token for the rest.
//
// Input: byte 0 picks the route (a letter from kRoutes, else byte % count), the rest is the
// body. Properties checked beyond "no crash, no sanitizer report": only
// KeyError(invalid_argument) ever escapes (a std::exception of another kind would be a 500),
// an accepted body nests no deeper than the limit.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <typeinfo>
#include <vector>

#include "api/api_service.hpp"
#include "api/route.hpp"
#include "common/encoding.hpp"
#include "keys/envelope.hpp"
#include "keys/errors.hpp"

namespace api = p11kms::api;
namespace keys = p11kms::keys;
using json = nlohmann::json;

namespace {

constexpr size_t kMaxDepth = 64;  // ApiLimits' default

// Selector letter -> the transit route (POST) whose body it is.
struct RouteSel {
  char letter;
  const char* pattern;
};
const RouteSel kRoutes[] = {
    {'k', "transit/keys/:name"},
    {'c', "transit/keys/:name/config"},
    {'o', "transit/keys/:name/rotate"},
    {'e', "transit/encrypt/:name"},
    {'d', "transit/decrypt/:name"},
    {'r', "transit/rewrap/:name"},
    {'p', "transit/datakey/:plaintext/:name"},
    {'n', "transit/random"},
    {'N', "transit/random/:urlbytes"},
    {'S', "transit/random/:source/:urlbytes"},
    {'h', "transit/hash"},
    {'H', "transit/hash/:urlalgorithm"},
};
constexpr size_t kRouteCount = sizeof kRoutes / sizeof kRoutes[0];

[[noreturn]] void finding(const std::string& what) {
  fprintf(stderr, "fuzz request_body: %s\n", what.c_str());
  abort();
}

const std::vector<const api::Route*>& routes() {
  static const api::Router router = [] {
    api::Router r;
    api::add_transit_routes(r);
    return r;
  }();
  static const std::vector<const api::Route*> table = [] {
    std::vector<const api::Route*> t;
    for (const auto& sel : kRoutes) {
      const api::Route* found = nullptr;
      for (const auto& r : router.routes())
        if (r.method == "POST" && r.pattern == sel.pattern) found = &r;
      if (!found) finding(std::string("route POST ") + sel.pattern + " is no longer declared; update kRoutes");
      t.push_back(found);
    }
    return t;
  }();
  return table;
}

size_t depth_of(const json& j) {
  if (!j.is_structured()) return 0;
  size_t d = 0;
  for (const auto& v : j) d = std::max(d, depth_of(v));
  return d + 1;
}

// Runs f; a KeyError(invalid_argument) is the normal answer to bad input; anything else is a
// finding (it would be a 500, or a crash).
template <typename F>
void expect_ok_or_invalid(const char* what, const std::string& field, F&& f) {
  try {
    f();
  } catch (const keys::KeyError& e) {
    if (e.kind() != keys::ErrorKind::invalid_argument)
      finding(std::string(what) + "(\"" + field + "\") threw KeyError of kind " +
              std::to_string(static_cast<int>(e.kind())) + ": " + e.what());
  } catch (const std::exception& e) {
    finding(std::string(what) + "(\"" + field + "\") threw " + typeid(e).name() + ": " + e.what());
  }
}

void exercise(const api::FieldData& f, const std::vector<api::Field>& fields) {
  for (const auto& field : fields) {
    const std::string& n = field.name;
    (void)f.has(n);
    // Every getter on every declared field: FieldData is weakly typed, as Vault's is.
    expect_ok_or_invalid("get_string", n, [&] {
      std::string s = f.get_string(n);
      if (n == "plaintext" || n == "associated_data" || n == "input") (void)p11kms::encoding::base64_decode(s);
      if (n == "ciphertext" && !s.empty()) (void)keys::parse_transit_ciphertext(s);
    });
    expect_ok_or_invalid("get_int", n, [&] { (void)f.get_int(n); });
    expect_ok_or_invalid("get_bool", n, [&] { (void)f.get_bool(n); });
    expect_ok_or_invalid("get_array", n, [&] { (void)f.get_array(n); });
  }
  (void)f.unknown_fields();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& table = routes();
  if (size == 0) return 0;
  size_t idx = data[0] % kRouteCount;
  for (size_t i = 0; i < kRouteCount; ++i)
    if (kRoutes[i].letter == static_cast<char>(data[0])) idx = i;
  const api::Route& route = *table[idx];
  std::string body(reinterpret_cast<const char*>(data) + 1, size - 1);

  // As ApiService::handle_vault: a blank body is no body; otherwise a JSON object.
  json values = json::object();
  if (body.find_first_not_of(" \t\r\n") != std::string::npos) {
    try {
      values = api::parse_body(body, kMaxDepth);
    } catch (const keys::KeyError& e) {
      if (e.kind() != keys::ErrorKind::invalid_argument) finding(std::string("parse_body threw a non-400 KeyError: ") + e.what());
      return 0;
    } catch (const std::exception& e) {
      finding(std::string("parse_body threw ") + typeid(e).name() + ": " + e.what());
    }
    if (depth_of(values) > kMaxDepth) finding("parse_body accepted a body nested deeper than its limit");
    if (!values.is_object()) return 0;  // 400 "the request body must be a JSON object"
  }
  // URL parameters override the body, as in handle_vault.
  for (const char* p = route.pattern.c_str(); (p = std::strchr(p, ':')) != nullptr;) {
    const char* end = std::strchr(p, '/');
    std::string param(p + 1, end ? end : p + std::strlen(p));
    values[param] = param == "plaintext" ? "plaintext" : "fz";
    p = end ? end : p + std::strlen(p);
  }
  api::FieldData f(&route.fields, values);
  exercise(f, route.fields);

  // batch_input items, as single_or_batch reads them (each an object, read with the single-call
  // fields; the route's declared fields are a superset of the item fields).
  json batch = json::array();
  expect_ok_or_invalid("get_array", "batch_input", [&] {
    bool declared = false;
    for (const auto& fd : route.fields) declared = declared || fd.name == "batch_input";
    if (declared) batch = f.get_array("batch_input");
  });
  for (const auto& item : batch) {
    if (!item.is_object()) continue;
    api::FieldData fi(&route.fields, item);
    exercise(fi, route.fields);
  }
  return 0;
}
