// Fuzz target: the real ApiService::handle, over a throwaway SoftHSM token and SQLite file, for
// every transit route that takes a request body. This is the end-to-end request path minus the
// HTTP adapter: auth, routing, namespace and policy checks, parse_body, query merge, FieldData,
// the route's callback, KeyService (envelope parsing, versions, the token's AES-GCM, random,
// digests), the audit record (HMACs in the token) and the Vault-shaped rendering. Slower than
// request_body (each call reaches the token), so it complements it rather than replaces it.
//
// Input: byte 0 picks the route (a letter from kRoutes, else byte % count); the bytes up to
// the first '\n' are a raw query string (k=v&k2=v2, no percent-decoding, as the adapter hands
// it over already decoded); the rest is the body. In the query and the body, @CT1@, @CT2@ and
// @CTA@ are replaced by real ciphertexts of the key "fz" (version 1, version 2, version 2 with
// associated_data "YWFk"), so decrypt and rewrap seeds reach the successful path.
// Properties beyond "no crash, no sanitizer report": no 5xx (bad input is a 4xx; the token is
// healthy), a non-204 answer is JSON, every answer carries X-Request-Id.
//
// P11KMS_FUZZ_VERBOSE=1 prints each request's path and answer (to check what seeds reach).
//
// Key state: "fz" (2 versions) serves encrypt/decrypt/rewrap/datakey; create targets "fz" too
// (exists, left unchanged); config targets "fzcfg", so its changes never affect the others.
// Rotate and delete are not fuzzed: they take no body fields, and rotate would grow the token.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "api/api_service.hpp"
#include "audit/audit_log.hpp"
#include "common/encoding.hpp"
#include "common/log.hpp"
#include "hsm/session_pool.hpp"
#include "hsm/token.hpp"
#include "keys/key_service.hpp"
#include "policy/access_control.hpp"
#include "store/metadata_store.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;
using json = nlohmann::json;

namespace {

constexpr const char* kApiToken = "hvs.fuzz-root-token";

struct RouteSel {
  char letter;
  const char* path;  // after /v1/
};
const RouteSel kRoutes[] = {
    {'k', "transit/keys/fz"},
    {'c', "transit/keys/fzcfg/config"},
    {'e', "transit/encrypt/fz"},
    {'d', "transit/decrypt/fz"},
    {'r', "transit/rewrap/fz"},
    {'p', "transit/datakey/plaintext/fz"},
    {'w', "transit/datakey/wrapped/fz"},
    {'n', "transit/random"},
    {'N', "transit/random/24"},
    {'S', "transit/random/all/24"},
    {'h', "transit/hash"},
    {'H', "transit/hash/sha2-512"},
};
constexpr size_t kRouteCount = sizeof kRoutes / sizeof kRoutes[0];

std::shared_ptr<const policy::AccessRules> root_rules() {
  policy::TokenEntry root;
  root.name = "fuzz-root";
  root.sha256 = policy::sha256_of(kApiToken);
  root.policies = {"root"};
  root.namespaces = {"root"};
  return std::make_shared<policy::AccessRules>(std::vector<policy::TokenEntry>{root},
                                               std::map<std::string, policy::Policy>{});
}

struct Fixture {
  // Members are destroyed in reverse: the service, the pool (closing its sessions), the store,
  // then the temp dirs.
  test_support::TempToken token{"p11kms-fuzz"};
  std::string db_dir = test_support::make_temp_dir("p11kms-fuzz-db");
  std::unique_ptr<store::MetadataStore> store = store::open_sqlite_store(db_dir + "/p11kms.db");
  hsm::SessionPool pool{token.pool_config(2)};
  hsm::Token hsm{pool};
  keys::KeyService keys{*store, hsm};
  policy::AccessControl access{root_rules()};
  api::ApiService service{keys, access, api::ApiLimits{}, "fuzz"};
  // The audit log as the server runs it (HMACs of every secret field in the token), written
  // to /dev/null: the work per request without a file growing at thousands of lines a second.
  audit::AuditLog audit_log{audit::AuditOptions{"/dev/null", "", true}, hsm, *store};
  std::string ct1, ct2, cta;

  Fixture() {
    service.set_audit(&audit_log);
    const keys::KeyRef fz{"root", "fz"};
    keys.create_key(fz, "aes256-gcm96");
    keys.create_key({"root", "fzcfg"}, "aes128-gcm96");
    const std::string hello = "hello";
    auto pt = reinterpret_cast<const uint8_t*>(hello.data());
    ct1 = keys.encrypt(fz, pt, hello.size(), 1).ciphertext;
    keys.rotate_key(fz);
    ct2 = keys.encrypt(fz, pt, hello.size(), 0).ciphertext;
    cta = keys.encrypt(fz, pt, hello.size(), 0, {'a', 'a', 'd'}).ciphertext;
  }
  ~Fixture() { test_support::remove_tree(db_dir); }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t at = 0; (at = s.find(from, at)) != std::string::npos; at += to.size()) s.replace(at, from.size(), to);
}

// One line naming the finding and the answer's status and first error (scripts/fuzz groups
// crashes by it), then the details.
[[noreturn]] void finding(const std::string& what, const api::http::Request& req, const api::http::Response& resp) {
  std::string first_error;
  auto body = json::parse(resp.body, nullptr, false);
  if (body.is_object() && body.contains("errors") && body["errors"].is_array() && !body["errors"].empty())
    first_error = body["errors"][0].dump(-1, ' ', false, json::error_handler_t::replace);
  fprintf(stderr, "fuzz transit_request: %s: %d %s\n  request: POST %s (%zu query params) body %zu bytes\n  response: %s\n",
          what.c_str(), resp.status, first_error.c_str(), req.path.c_str(), req.query.size(), req.body.size(),
          resp.body.c_str());
  abort();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  log::set_level(log::Level::error);  // one info line per request would drown the fuzzer's output
  fixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Fixture& fx = fixture();
  if (size == 0) return 0;
  size_t idx = data[0] % kRouteCount;
  for (size_t i = 0; i < kRouteCount; ++i)
    if (kRoutes[i].letter == static_cast<char>(data[0])) idx = i;

  std::string rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  std::string query, body;
  if (auto nl = rest.find('\n'); nl != std::string::npos) {
    query = rest.substr(0, nl);
    body = rest.substr(nl + 1);
  } else {
    body = rest;
  }
  for (std::string* s : {&query, &body}) {
    replace_all(*s, "@CT1@", fx.ct1);
    replace_all(*s, "@CT2@", fx.ct2);
    replace_all(*s, "@CTA@", fx.cta);
  }

  api::http::Request req;
  req.method = "POST";
  req.path = std::string("/v1/") + kRoutes[idx].path;
  req.headers = {{"X-Vault-Token", kApiToken}, {"Content-Type", "application/json"}};
  req.remote_address = "127.0.0.1";
  size_t start = 0;
  while (!query.empty() && start <= query.size()) {
    size_t amp = query.find('&', start);
    if (amp == std::string::npos) amp = query.size();
    std::string kv = query.substr(start, amp - start);
    size_t eq = kv.find('=');
    if (!kv.empty())
      req.query.emplace_back(kv.substr(0, eq), eq == std::string::npos ? std::string() : kv.substr(eq + 1));
    start = amp + 1;
  }
  req.body = std::move(body);

  api::http::Response resp = fx.service.handle(req);
  static const bool verbose = std::getenv("P11KMS_FUZZ_VERBOSE") != nullptr;
  if (verbose) fprintf(stderr, "%s -> %d %s\n", req.path.c_str(), resp.status, resp.body.c_str());
  if (resp.status >= 500) finding("5xx answer to a request (bad input must be a 4xx)", req, resp);
  if (resp.status != 204 && !json::accept(resp.body)) finding("answer body is not JSON", req, resp);
  bool has_id = false;
  for (const auto& [k, v] : resp.headers) has_id = has_id || k == "X-Request-Id";
  if (!has_id) finding("answer without X-Request-Id", req, resp);
  return 0;
}
