// A route is a declaration, in the style of Vault's framework.Path: a method and a pattern,
// typed fields with descriptions, one callback and a summary. Validation, error messages and
// docs all come from the declaration.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "api/http/types.hpp"
#include "policy/policy.hpp"
#include "policy/token_auth.hpp"

namespace p11kms::keys {
class KeyService;
class MountRegistry;
class ByokRegistry;
class Keyring;
class KongKeys;
}

namespace p11kms::api {

using json = nlohmann::json;

enum class FieldType { string, integer, boolean, array, object };
const char* field_type_name(FieldType t);

struct Field {
  std::string name;
  FieldType type = FieldType::string;
  std::string description;
  json default_value = nullptr;
};

// Typed access to a request's parameters (URL segments, query, JSON body), checked against
// the route's declared fields. Vault's decoding is weak ("5" is an integer, "true" a boolean),
// and so is this, so clients that send strings keep working.
class FieldData {
 public:
  FieldData() = default;
  FieldData(const std::vector<Field>* schema, json values) : schema_(schema), values_(std::move(values)) {}
  // Reads `values` where they are (a batch item, read in place of a copy); they must outlive it.
  static FieldData view(const std::vector<Field>* schema, const json& values) {
    FieldData f;
    f.schema_ = schema;
    f.view_ = &values;
    return f;
  }

  bool has(const std::string& name) const;
  std::string get_string(const std::string& name) const;
  int64_t get_int(const std::string& name) const;
  bool get_bool(const std::string& name) const;
  const json& get_array(const std::string& name) const;  // an empty array if absent
  const json& raw() const { return view_ ? *view_ : values_; }
  std::vector<std::string> unknown_fields() const;

 private:
  const Field& field(const std::string& name) const;
  const json* value(const std::string& name) const;
  const std::vector<Field>* schema_ = nullptr;
  json values_ = json::object();
  const json* view_ = nullptr;  // read instead of values_ when set
};

struct ApiLimits;

struct Context {
  const http::Request& request;
  keys::KeyService* keys = nullptr;
  const ApiLimits* limits = nullptr;
  std::string request_id;
  // Where the route's keys live: the namespace, or for a transit route under a mounted engine
  // that mount's key space (MountRegistry::keyspace).
  std::string ns = "root";
  std::string tenant = "root";                // the namespace itself (X-Vault-Namespace)
  keys::MountRegistry* mounts = nullptr;
  keys::ByokRegistry* byok = nullptr;  // the BYOK key registry (byok dialect); nullptr: none
  keys::Keyring* keyring = nullptr;    // the Kong keyring (keyring dialect); nullptr: none
  keys::KongKeys* kong = nullptr;      // Kong's keys and key sets (jwks dialect); nullptr: none
  const policy::TokenEntry* token = nullptr;
  std::map<std::string, std::string> params;  // from the URL pattern
  FieldData fields;
  const policy::PolicySet* policies = nullptr;  // this request's snapshot
  std::string path;                             // the policy path (after /v1/)

  // For a callback whose work needs a second capability on its own path (encrypt that
  // creates the key needs `create` too).
  bool may(policy::Capability capability) const {
    return token && policies && policies->allows(token->policies, path, capability);
  }
};

// What a callback returns: a status and the dialect's payload (for Vault, the "data" object).
struct Reply {
  int status = 200;
  json data = nullptr;
  std::vector<std::string> warnings;
  bool raw = false;  // body is `data` itself, not wrapped in the dialect's envelope
  http::Headers headers = {};  // extra response headers (Key Protect's Key-Total)
};

using Callback = std::function<Reply(Context&)>;

struct Route {
  std::string method;   // GET, POST, DELETE, LIST
  std::string pattern;  // relative to the dialect's mount, e.g. "transit/keys/:name"
  std::vector<Field> fields;
  std::string summary;
  Callback callback;
  // What a policy must grant on the request's path (as Vault: the path after /v1/).
  // 0: any valid token may call it; unauthenticated routes need no token at all.
  policy::Capabilities capability = policy::kUpdate;
  bool authenticated = true;
  // Key Protect selects an operation by `?action=wrap` on one URL: a route with an action
  // matches only that query value. (IBM's SDKs use `.../actions/wrap` instead: such a route
  // names the action in its pattern and leaves this empty.)
  std::string action = {};
  // The policy path, in the pattern's syntax (":id"), relative to the mount; empty: the
  // request's own path. Both Key Protect forms of an action share `keys/:id/wrap`.
  std::string policy_pattern = {};
};

class Router {
 public:
  void add(Route route);
  const std::vector<Route>& routes() const { return routes_; }

  enum class Outcome { found, not_found, method_not_allowed, unknown_action };
  struct Match {
    Outcome outcome = Outcome::not_found;
    const Route* route = nullptr;
    std::map<std::string, std::string> params;
    std::vector<std::string> actions;  // for unknown_action: what the path and method offer
  };
  // `action` is the request's ?action= value ("" when absent).
  Match match(const std::string& method, const std::string& path, const std::string& action = "") const;

 private:
  std::vector<Route> routes_;
  // Each route's pattern split at '/', once: match() runs for every request against every route.
  std::vector<std::vector<std::string>> segments_;
};

}  // namespace p11kms::api
