// A dialect is one API family over the one KeyService: where it is mounted, its route table,
// how it names namespaces, and the shapes of its answers and errors. ApiService runs the same
// pipeline (auth, rate limit, routing, namespace, policy, body) for every dialect.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "api/http/types.hpp"
#include "api/route.hpp"

namespace p11kms::api {

struct Dialect {
  std::string name;           // "vault", "kms"
  std::string mount;          // request path prefix, e.g. "/v1/"
  std::string policy_prefix;  // prepended to the path after the mount for policy checks ("kms/")
  Router router;
  // What a request without a valid token gets: Vault answers 403, Key Protect 401.
  int unauthenticated_status = 403;
  // Headers that name the namespace, first present wins; absent = "root".
  std::vector<std::string> namespace_headers;
  // Vault's verbs: PUT is POST, GET with ?list=true is LIST; trailing '/' trimmed from the
  // namespace. Otherwise methods and namespaces are taken verbatim.
  bool vault_conventions = false;
  // Whether routes are selected by `?action=` (Key Protect).
  bool uses_actions = false;
  // Confluent's HTTP Basic auth is accepted too: `Authorization: Basic base64(<token name>:<token>)`,
  // the name matching the token's configured name.
  bool basic_auth = false;
  http::Response (*render)(const Reply& reply, const std::string& request_id) = nullptr;
  http::Response (*error)(int status, const std::string& code, const std::string& message) = nullptr;
  // The request's parameters from its body (nullptr: a JSON object, as parse_body); Kong's
  // dialects also take form encodings (api/form_body.hpp).
  nlohmann::json (*parse_body)(const http::Request& request, size_t max_json_depth) = nullptr;

  // The policy path of a request: prefix + the route's policy pattern with the request's
  // parameters, or else the path after the mount (no trailing '/').
  std::string policy_path(const std::string& path, const Route* route,
                          const std::map<std::string, std::string>& params) const;
  // The policy path pattern of a route for docs: :param shown as <param>.
  std::string policy_pattern(const Route& route) const;
};

// The dialects' route tables: pure declarations (callbacks reach the service through their
// Context), so they can also be rendered as documentation without a token or a store.
Dialect vault_dialect(const std::string& version);  // /v1/: transit, sys, auth
Dialect kms_dialect();                              // /kms/api/v2/: Key Protect-style keys
Dialect byok_dialect();                             // /byok/v1/: Confluent-style BYOK key registry
Dialect keyring_dialect();                          // /keyring: Kong's keyring (cluster strategy)
Dialect kong_keys_dialect();                        // /keys: Kong's keys (JWK/PEM), sign, decrypt
Dialect kong_key_sets_dialect(bool jwks_public);    // /key-sets: Kong's key sets and their JWKS

}  // namespace p11kms::api
