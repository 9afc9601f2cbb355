#include "api/api_service.hpp"

#include <algorithm>
#include <cstdio>
#include <chrono>

#include <openssl/crypto.h>
#include <strings.h>

#include "api/vault_shape.hpp"
#include "common/encoding.hpp"
#include "common/log.hpp"
#include "common/uuid.hpp"

namespace p11kms::api {
namespace {

// Client-controlled text in a log line: control characters (a decoded %0A could forge a line)
// are shown escaped.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// A client's id is echoed only if it is a sane token (no header injection, bounded length).
bool sane_header_value(const std::string& v) {
  bool ok = !v.empty() && v.size() <= 128;
  for (char c : v) ok = ok && c > 0x20 && c < 0x7f;
  return ok;
}

std::string request_id_of(const http::Request& r) {
  if (auto id = r.header("X-Request-Id"); id && sane_header_value(*id)) return *id;
  return uuid::new_v4();
}

std::string presented_token(const http::Request& r) {
  if (auto t = r.header("X-Vault-Token")) return *t;
  if (auto a = r.header("Authorization")) {
    const std::string prefix = "Bearer ";
    if (a->size() > prefix.size() && strncasecmp(a->c_str(), prefix.c_str(), prefix.size()) == 0)
      return a->substr(prefix.size());
  }
  return {};
}

// Confluent's HTTP Basic credentials: base64(<token name>:<token>) -> (name, token).
std::optional<std::pair<std::string, std::string>> basic_credentials(const http::Request& r) {
  auto a = r.header("Authorization");
  const std::string prefix = "Basic ";
  if (!a || a->size() <= prefix.size() || strncasecmp(a->c_str(), prefix.c_str(), prefix.size()) != 0) return std::nullopt;
  auto decoded = encoding::base64_decode(a->substr(prefix.size()));
  if (!decoded) return std::nullopt;
  std::string text(decoded->begin(), decoded->end());
  OPENSSL_cleanse(decoded->data(), decoded->size());
  size_t colon = text.find(':');
  if (colon == std::string::npos) return std::nullopt;
  std::pair<std::string, std::string> out{text.substr(0, colon), text.substr(colon + 1)};
  OPENSSL_cleanse(text.data(), text.size());
  return out;
}

bool valid_namespace(const std::string& ns) {
  if (ns.empty() || ns.size() > 64) return false;
  for (char c : ns)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
      return false;
  return true;
}

bool may_use_namespace(const policy::TokenEntry& t, const std::string& ns) {
  for (const auto& n : t.namespaces)
    if (n == "*" || n == ns) return true;
  return false;
}

// Fields that carry data which must never reach the audit log in clear.
bool is_secret_field(const std::string& name) {
  static const char* names[] = {"plaintext", "ciphertext", "context", "nonce", "associated_data", "input",
                                "batch_input", "batch_results", "signature", "hmac", "payload", "aad",
                                "random_bytes", "sum"};
  for (const char* n : names)
    if (name == n) return true;
  return false;
}

void collect_secrets(const json& object, std::vector<std::pair<std::string, std::string>>& out) {
  if (!object.is_object()) return;
  for (auto it = object.begin(); it != object.end(); ++it)
    if (is_secret_field(it.key()) && !it->is_null())
      out.emplace_back(it.key(), it->is_string() ? it->get<std::string>()
                                                 : it->dump(-1, ' ', false, json::error_handler_t::replace));
}

int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

namespace {
// Nesting depth of a JSON text, counted before parsing: exact for empty containers too, and it
// keeps absurdly deep input (half a million levels fit in 1 MiB) away from the parser.
size_t json_depth(const std::string& text) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}
}  // namespace

json parse_body(const std::string& body, size_t max_depth) {
  if (json_depth(body) > max_depth)
    throw keys::invalid("request body nests JSON deeper than the limit of " + std::to_string(max_depth));
  try {
    return json::parse(body);
  } catch (const json::parse_error& e) {
    // nlohmann's message quotes the bytes read; keep only its position, not the client's bytes.
    throw keys::invalid("failed to parse JSON request body: malformed JSON at byte " + std::to_string(e.byte));
  } catch (const json::exception&) {
    // e.g. out_of_range for a number such as 1e400 (found by the fuzzer).
    throw keys::invalid("failed to parse JSON request body: a number is out of range");
  }
}

std::string Dialect::policy_path(const std::string& path, const Route* route,
                                 const std::map<std::string, std::string>& params) const {
  if (!route || route->policy_pattern.empty()) {
    std::string p = policy_prefix + path;
    while (!p.empty() && p.back() == '/') p.pop_back();
    return p;
  }
  std::string out = policy_prefix;
  const std::string& pattern = route->policy_pattern;
  size_t i = 0;
  while (i < pattern.size()) {
    if (pattern[i] == ':' && (i == 0 || pattern[i - 1] == '/')) {
      size_t end = pattern.find('/', i);
      if (end == std::string::npos) end = pattern.size();
      auto it = params.find(pattern.substr(i + 1, end - i - 1));
      out += it == params.end() ? std::string() : it->second;
      i = end;
    } else {
      out += pattern[i++];
    }
  }
  return out;
}

std::string Dialect::policy_pattern(const Route& route) const {
  const std::string& pattern = route.policy_pattern.empty() ? route.pattern : route.policy_pattern;
  std::string out;
  size_t i = 0;
  while (i < pattern.size()) {
    if (pattern[i] == ':' && (i == 0 || pattern[i - 1] == '/')) {
      size_t end = pattern.find('/', i);
      if (end == std::string::npos) end = pattern.size();
      out += "<" + pattern.substr(i + 1, end - i - 1) + ">";
      i = end;
    } else {
      out += pattern[i++];
    }
  }
  return policy_prefix + out;
}

ApiService::ApiService(keys::KeyService& keys, const policy::AccessControl& access, ApiLimits limits,
                       std::string version)
    : keys_(keys), access_(access), limits_(limits) {
  dialects_.push_back(vault_dialect(version));
  dialects_.push_back(kms_dialect());
  dialects_.push_back(byok_dialect());
  dialects_.push_back(keyring_dialect());
  dialects_.push_back(kong_keys_dialect());
  dialects_.push_back(kong_key_sets_dialect(limits_.jwks_public));
  if (limits_.rate_limit) rate_limiter_ = std::make_unique<policy::RateLimiter>(*limits_.rate_limit);
}

bool ApiService::drain(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(inflight_mu_);
  return inflight_cv_.wait_for(lk, timeout, [&] { return inflight_ == 0; });
}

const Dialect* ApiService::dialect_for(const std::string& path) const {
  for (const auto& d : dialects_)
    if (path.rfind(d.mount, 0) == 0) return &d;
  // "/kms/api/v2/keys" without a trailing slash is the collection itself.
  for (const auto& d : dialects_)
    if (path + "/" == d.mount) return &d;
  return nullptr;
}

http::Response ApiService::handle(const http::Request& request) {
  {
    std::lock_guard<std::mutex> lk(inflight_mu_);
    ++inflight_;
  }
  struct InflightGuard {
    ApiService* self;
    ~InflightGuard() {
      std::lock_guard<std::mutex> lk(self->inflight_mu_);
      if (--self->inflight_ == 0) self->inflight_cv_.notify_all();
    }
  } guard{this};
  auto started = std::chrono::steady_clock::now();
  std::string request_id = request_id_of(request);
  http::Response resp;
  audit::AuditRecord record;
  record.request_id = request_id;
  record.ns = "root";
  record.method = request.method;
  record.path = request.path;
  const Dialect* d = dialect_for(request.path);
  const Dialect& shape = d ? *d : dialects_.front();  // unknown paths answer in Vault's shape
  try {
    if (request.headers_too_large) {
      resp = shape.error(431, "headers_too_large",
                         "request headers exceed the limit of " + std::to_string(limits_.max_header_bytes) + " bytes");
    } else if (request.body_too_large) {
      resp = shape.error(413, "body_too_large",
                         "request body exceeds the limit of " + std::to_string(limits_.max_body_bytes) + " bytes");
    } else if (d) {
      http::Headers extra;
      std::string rel = request.path.size() >= d->mount.size() ? request.path.substr(d->mount.size()) : "";
      resp = handle_dialect(*d, request, rel, request_id, extra, record);
      resp.headers.insert(resp.headers.end(), extra.begin(), extra.end());
    } else {
      resp = shape.error(404, "not_found", "no handler for route \"" + request.path + "\"");
    }
  } catch (const std::exception& e) {
    log::error(std::string("unexpected error: ") + e.what(), request_id);
    resp = shape.error(500, "internal", "internal error; see the server log for request id " + request_id);
  }
  if (audit_) {
    record.status = resp.status;
    record.latency_ms =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count() / 1000.0;
    try {
      audit_->write(record);
    } catch (const std::exception& e) {
      log::error(std::string("audit: ") + e.what(), request_id);
      // Fail closed: the client is not told success that the log cannot vouch for.
      if (audit_->fail_closed() && record.capability)
        resp = shape.error(503, "audit_unavailable", "the audit log cannot be written; request refused");
    }
  }
  // A HEAD answer never carries a body, errors included: on a keep-alive connection the bytes
  // would be read as the next response.
  if (request.method == "HEAD") resp.body.clear();
  resp.headers.emplace_back("X-Request-Id", request_id);
  if (auto cid = request.header("correlation-id"); cid && sane_header_value(*cid))
    resp.headers.emplace_back("correlation-id", *cid);
  // A route may say how its answer is cached (the JWKS); everything else is no-store.
  if (std::none_of(resp.headers.begin(), resp.headers.end(),
                   [](const auto& h) { return strcasecmp(h.first.c_str(), "Cache-Control") == 0; }))
    resp.headers.emplace_back("Cache-Control", "no-store");
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count();
  log::access(printable(request.method) + " " + printable(request.path) + " " + std::to_string(resp.status) + " " +
                  log::duration_ms(us),
              request_id);
  return resp;
}

http::Response ApiService::handle_dialect(const Dialect& d, const http::Request& request, const std::string& path,
                                          const std::string& request_id, http::Headers& extra_headers,
                                          audit::AuditRecord& record) {
  try {
    std::string method = request.method;
    if (d.vault_conventions) {
      // Vault treats GET ...?list=true as LIST, for clients that cannot send the LIST verb.
      if (method == "PUT") method = "POST";  // Vault makes no difference between the two
      if (method == "GET" && request.query_param("list").value_or("") == "true") method = "LIST";
    }
    std::string action = d.uses_actions ? request.query_param("action").value_or("") : "";
    std::string ns = "root";
    for (const auto& h : d.namespace_headers) {
      auto value = request.header(h);
      if (!value) continue;
      std::string n = *value;
      if (d.vault_conventions)
        while (!n.empty() && n.back() == '/') n.pop_back();
      if (!n.empty()) ns = n;
      break;
    }
    // A transit engine mounted elsewhere (`payments/encrypt/x`) is served by the transit
    // routes; its keys live in the mount's own key space. The policy path stays the request's.
    std::string route_path = path;
    std::string keyspace = ns;
    if (d.vault_conventions && mounts_ && valid_namespace(ns)) {
      std::string first = path.substr(0, path.find('/'));
      if (first != "sys" && first != "auth" && first != keys::MountRegistry::kDefaultPath && !first.empty() &&
          first.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") ==
              std::string::npos &&
          mounts_->find(ns, first)) {
        route_path = std::string(keys::MountRegistry::kDefaultPath) + path.substr(first.size());
        keyspace = keys::MountRegistry::keyspace(ns, first);
      }
    }
    // Vault's router takes `sys/mounts/payments/` as `sys/mounts/payments`.
    if (d.vault_conventions)
      while (route_path.size() > 1 && route_path.back() == '/') route_path.pop_back();
    auto m = d.router.match(method, route_path, action);
    auto rules = access_.current();  // one snapshot for the whole request (SIGHUP may swap it)
    const policy::TokenEntry* token = nullptr;
    bool needs_auth = m.outcome != Router::Outcome::found || m.route->authenticated;
    if (needs_auth) {
      // Authentication comes before routing, as in Vault: without a valid token nothing about
      // the route table is revealed.
      std::string presented = presented_token(request);
      std::optional<std::string> basic_name;
      if (d.basic_auth && presented.empty())
        if (auto b = basic_credentials(request)) {
          basic_name = std::move(b->first);
          presented = std::move(b->second);
        }
      token = rules->authenticator.authenticate(presented, now_seconds());
      if (token && basic_name && *basic_name != token->name) token = nullptr;  // the name must match too
      // mTLS: without a token header, a client certificate bound to a token (cert_sha256)
      // authenticates as that token. A presented token is judged on its own, as always.
      if (!token && presented.empty() && !basic_name && !request.client_cert_sha256.empty())
        token = rules->authenticator.authenticate_cert(request.client_cert_sha256, now_seconds());
      if (!presented.empty()) OPENSSL_cleanse(presented.data(), presented.size());
      if (!token)
        return d.error(d.unauthenticated_status, "unauthorized",
                       d.unauthenticated_status == 401 ? "a valid token is required (Authorization: Bearer <token>)"
                                                        : "permission denied");
      record.token = token->name;
      if (rate_limiter_) {
        auto rl = rate_limiter_->take(token->name, std::chrono::steady_clock::now());
        extra_headers.emplace_back("X-RateLimit-Limit", std::to_string(rl.limit));
        extra_headers.emplace_back("X-RateLimit-Remaining", std::to_string(rl.remaining));
        extra_headers.emplace_back("X-RateLimit-Reset", std::to_string(rl.reset_s));
        if (!rl.allowed) {
          extra_headers.emplace_back("Retry-After", std::to_string(rl.retry_after_s));
          return d.error(429, "rate_limited",
                         "rate limit exceeded for this token; retry after " + std::to_string(rl.retry_after_s) + " s");
        }
      }
    }
    if (m.outcome == Router::Outcome::not_found)
      return d.error(404, "not_found", "no handler for route \"" + path + "\": route entry not found");
    if (m.outcome == Router::Outcome::method_not_allowed)
      return d.error(405, "method_not_allowed",
                     "unsupported operation: " + request.method + " is not allowed on \"" + path + "\"");
    if (m.outcome == Router::Outcome::unknown_action) {
      std::string list;
      for (const auto& a : m.actions) list += (list.empty() ? "" : ", ") + a;
      return d.error(400, "invalid_action",
                     (action.empty() ? std::string("the action query parameter is required")
                                     : "unsupported action \"" + printable(action) + "\"") +
                         ": action must be one of " + list);
    }

    Context ctx{request, &keys_, &limits_, request_id};
    ctx.token = token;
    ctx.params = m.params;
    ctx.policies = &rules->policies;
    ctx.path = d.policy_path(path, m.route, m.params);
    if (m.route->authenticated)
      record.capability = m.route->capability ? policy::capability_name(static_cast<policy::Capability>(m.route->capability))
                                              : "any";
    if (m.params.count("name")) record.key = m.params.at("name");
    if (m.params.count("id")) record.key = m.params.at("id");
    ctx.tenant = ns;
    ctx.ns = keyspace;
    ctx.mounts = mounts_;
    ctx.byok = byok_;
    ctx.keyring = keyring_;
    ctx.kong = kong_;
    record.ns = ns;
    if (!valid_namespace(ns))
      return d.error(400, "invalid_namespace",
                     "invalid namespace in " + d.namespace_headers.front() + ": 1 to 64 characters of [A-Za-z0-9._-]");
    if (token && !may_use_namespace(*token, ns))
      return d.error(403, "forbidden", "permission denied: this token may not use namespace \"" + ns + "\"");
    // The policy is checked on the request's own path before anything looks at a key, so a
    // refusal never tells whether the key exists.
    if (token && m.route->capability != 0 &&
        !rules->policies.allows(token->policies, ctx.path, static_cast<policy::Capability>(m.route->capability)))
      return d.error(403, "forbidden", "permission denied");

    json values = json::object();
    bool has_body = request.body.find_first_not_of(" \t\r\n") != std::string::npos;
    if (d.parse_body) {
      values = d.parse_body(request, limits_.max_json_depth);
    } else if (has_body) {
      values = parse_body(request.body, limits_.max_json_depth);
      if (!values.is_object()) throw keys::invalid("the request body must be a JSON object");
    }
    for (const auto& [k, v] : request.query)
      if (!values.contains(k) && k != "list" && !(d.uses_actions && k == "action")) values[k] = v;
    for (const auto& [k, v] : m.params) values[k] = v;
    ctx.fields = FieldData(&m.route->fields, std::move(values));
    // Only for the audit log, which hashes them: without one, no copies of request data.
    if (audit_) collect_secrets(ctx.fields.raw(), record.request_secrets);
    if (record.key && ctx.fields.raw().contains("key_version") && ctx.fields.raw()["key_version"].is_number_integer())
      record.key_version = ctx.fields.raw()["key_version"].get<int>();
    // Fail closed before anything runs; health (no token, changes nothing) always answers.
    if (audit_ && m.route->authenticated && !audit_->ready())
      return d.error(503, "audit_unavailable", "the audit log cannot be written; request refused");

    Reply reply = m.route->callback(ctx);
    if (audit_) collect_secrets(reply.data, record.response_secrets);
    if (record.key && reply.data.is_object() && reply.data.contains("key_version") &&
        reply.data["key_version"].is_number_integer())
      record.key_version = reply.data["key_version"].get<int>();
    if (record.key && !record.key_version && reply.data.is_object() && reply.data.contains("latest_version") &&
        reply.data["latest_version"].is_number_integer())
      record.key_version = reply.data["latest_version"].get<int>();
    auto unknown = ctx.fields.unknown_fields();
    if (!unknown.empty() && !reply.raw && reply.status != 204) {
      std::string w = "Endpoint ignored these unrecognized parameters: [";
      for (size_t i = 0; i < unknown.size(); ++i) w += (i ? " " : "") + unknown[i];
      reply.warnings.push_back(w + "]");
    }
    auto response = d.render(reply, request_id);
    response.headers.insert(response.headers.end(), reply.headers.begin(), reply.headers.end());
    return response;
  } catch (const keys::KeyError& e) {
    if (e.kind() == keys::ErrorKind::internal) log::error(std::string("internal error: ") + e.what(), request_id);
    return d.error(vault::status_of(e.kind()), e.code(), e.kind() == keys::ErrorKind::internal
                                                            ? "internal error; see the server log for request id " + request_id
                                                            : std::string(e.what()));
  } catch (const std::exception& e) {
    log::error(std::string("unexpected error: ") + e.what(), request_id);
    return d.error(500, "internal", "internal error; see the server log for request id " + request_id);
  }
}

}  // namespace p11kms::api
