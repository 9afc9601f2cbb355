// The HTTP edge of the service: request ids, limits, authentication, routing to a dialect's
// routes and rendering errors in that dialect's shape. Knows JSON and HTTP, not PKCS#11 or SQL.
#pragma once

#include <string>

#include "api/dialect.hpp"
#include "api/http/types.hpp"
#include "api/route.hpp"
#include "audit/audit_sink.hpp"
#include "keys/key_service.hpp"
#include "keys/mount_registry.hpp"
#include "policy/access_control.hpp"
#include "policy/rate_limiter.hpp"

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>

namespace p11kms::api {

struct ApiLimits {
  size_t max_body_bytes = 1 << 20;
  size_t max_header_bytes = 16384;
  size_t max_json_depth = 64;
  size_t max_batch_items = 1000;
  std::optional<policy::RateLimit> rate_limit;  // per token; absent: no limit and no headers
  // Shortest transit auto_rotate_period accepted: Vault's hour, 10 s in dev mode so rotation
  // can be watched.
  int64_t min_auto_rotate_period_s = 3600;
  // jwks.public: GET /key-sets/{x}/jwks answers without a token.
  bool jwks_public = true;
};

class ApiService {
 public:
  ApiService(keys::KeyService& keys, const policy::AccessControl& access, ApiLimits limits,
             std::string version);
  http::Response handle(const http::Request& request);
  // Every request is then written to this log before its response is sent (nullptr: none).
  void set_audit(audit::AuditSink* sink) { audit_ = sink; }
  // Vault mounts: transit routes then also answer under every enabled mount (nullptr: only
  // transit/).
  void set_mounts(keys::MountRegistry* mounts) { mounts_ = mounts; }
  // The BYOK key registry the byok dialect serves (nullptr: its routes answer 503).
  void set_byok(keys::ByokRegistry* byok) { byok_ = byok; }
  // The Kong keyring the keyring dialect serves (nullptr: its routes answer 503).
  void set_keyring(keys::Keyring* keyring) { keyring_ = keyring; }
  // Kong's keys and key sets the jwks dialects serve (nullptr: their routes answer 503).
  void set_kong(keys::KongKeys* kong) { kong_ = kong; }
  // After the listener stopped accepting: waits until no request is being handled (or the
  // timeout passes), so nothing it uses (token sessions, store) is torn down under it.
  bool drain(std::chrono::milliseconds timeout);

 private:
  const Dialect* dialect_for(const std::string& path) const;
  http::Response handle_dialect(const Dialect& d, const http::Request& request, const std::string& path,
                                const std::string& request_id, http::Headers& extra_headers,
                                audit::AuditRecord& record);

  keys::KeyService& keys_;
  const policy::AccessControl& access_;
  ApiLimits limits_;
  std::vector<Dialect> dialects_;
  std::unique_ptr<policy::RateLimiter> rate_limiter_;
  audit::AuditSink* audit_ = nullptr;
  keys::MountRegistry* mounts_ = nullptr;
  keys::ByokRegistry* byok_ = nullptr;
  keys::Keyring* keyring_ = nullptr;
  keys::KongKeys* kong_ = nullptr;
  std::mutex inflight_mu_;
  std::condition_variable inflight_cv_;
  size_t inflight_ = 0;
};

// Route tables of the Vault dialect's families (vault_dialect() mounts them).
void add_transit_routes(Router& router);
void add_sys_routes(Router& router, const std::string& version);
void add_kms_routes(Router& router);
void add_byok_routes(Router& router);
void add_keyring_routes(Router& router);
// Markdown reference of a dialect's routes whose pattern starts with prefix, from the declarations.
std::string render_route_docs(const Dialect& dialect, const std::string& prefix);
// Markdown table of every route's policy path and capability.
std::string render_policy_table(const Dialect& dialect);

// Parses a JSON request body, refusing nesting deeper than max_depth (400 naming the limit).
json parse_body(const std::string& body, size_t max_depth);

}  // namespace p11kms::api
