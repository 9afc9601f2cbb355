#include "app/config.hpp"

#include "common/time.hpp"

#include <unistd.h>
#include <openssl/crypto.h>
#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <regex>
#include <map>
#include <set>
#include <sstream>

namespace p11kms::app {
namespace {

namespace fs = std::filesystem;

[[noreturn]] void fail(const std::string& key, const std::string& message) {
  throw ConfigError("config: " + key + ": " + message);
}

// Keys this release knows, per section. Sections whose features have not landed are known
// (so a typo is still reported as unknown) but refused with a message saying so.
const std::map<std::string, std::set<std::string>>& known_keys() {
  static const std::map<std::string, std::set<std::string>> k = {
      {"", {"listen", "hsm", "store", "auth", "policies", "audit", "keyring", "jwks", "byok", "limits", "cluster"}},
      {"listen", {"address", "tls", "threads", "handler_threads"}},
      {"listen.tls", {"cert_file", "key_file", "client_ca_file"}},
      {"hsm", {"module", "token_label", "pin_file", "pin_env", "sessions", "session_copies", "serialize_batches", "compose_gcm"}},
      {"store", {"driver", "path", "dsn", "password_file"}},
      {"auth", {"tokens"}},
      {"auth.tokens[]", {"name", "token_sha256", "policies", "namespaces", "expires", "cert_sha256"}},
      {"audit", {"path", "chain", "fail_closed", "max_bytes"}},
      {"byok", {"region", "validation_interval", "in_use_window", "max_keys"}},
      {"cluster", {"intent_lease", "heartbeat", "sweep_interval"}},
      {"keyring", {"strategy", "recipient_public_key_file", "vault"}},
      {"jwks", {"public"}},
      {"keyring.vault", {"address", "mount", "path", "token_file", "ca_file"}},
      {"limits", {"max_body_bytes", "max_json_depth", "max_batch_items", "max_header_bytes",
                  "max_key_name_length", "read_timeout_s", "rate_limit"}},
  };
  return k;
}

void check_keys(const YAML::Node& node, const std::string& section, const std::string& where) {
  if (!node.IsMap()) fail(where.empty() ? "(top level)" : where, "must be a mapping");
  const auto& allowed = known_keys().at(section);
  for (const auto& kv : node) {
    std::string key = kv.first.as<std::string>();
    if (!allowed.count(key))
      throw ConfigError("config: unknown key \"" + (where.empty() ? key : where + "." + key) + "\"");
  }
}

std::string str(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) fail(key, "must be a string");
  return n.as<std::string>();
}

bool boolean(const YAML::Node& n, const std::string& key) {
  if (!n.IsScalar()) fail(key, "must be true or false");
  std::string v = n.as<std::string>();
  if (v != "true" && v != "false") fail(key, "must be true or false");
  return v == "true";
}

// auto | true | false; auto (nullopt) is resolved against the module at start.
std::optional<bool> auto_boolean(const YAML::Node& n, const std::string& key) {
  std::string v = n.IsScalar() ? n.as<std::string>() : "";
  if (v != "auto" && v != "true" && v != "false") fail(key, "must be auto, true or false");
  if (v == "auto") return std::nullopt;
  return v == "true";
}

long long integer(const YAML::Node& n, const std::string& key, long long min, long long max) {
  if (!n.IsScalar()) fail(key, "must be an integer");
  long long v = 0;
  try {
    size_t used = 0;
    std::string s = n.as<std::string>();
    v = std::stoll(s, &used);
    if (used != s.size()) throw std::invalid_argument(s);
  } catch (const std::exception&) {
    fail(key, "must be an integer");
  }
  if (v < min || v > max) fail(key, "must be between " + std::to_string(min) + " and " + std::to_string(max));
  return v;
}

std::vector<std::string> string_list(const YAML::Node& n, const std::string& key) {
  if (!n.IsSequence()) fail(key, "must be a list of strings");
  std::vector<std::string> out;
  for (const auto& item : n) out.push_back(str(item, key));
  return out;
}

std::string absolute(const std::string& path, const std::string& base_dir) {
  fs::path p(path);
  return p.is_absolute() ? p.string() : (fs::path(base_dir) / p).lexically_normal().string();
}

int64_t parse_rfc3339(const std::string& s, const std::string& key) {
  auto t = timefmt::parse_rfc3339(s);
  if (!t) fail(key, "must be an RFC 3339 time such as 2027-01-01T00:00:00Z, and a real date");
  return *t;
}

// A duration: integer seconds, or a number with a unit s, m, h (90s, 5m, 24h).
int64_t duration(const YAML::Node& n, const std::string& key, int64_t min, int64_t max) {
  if (!n.IsScalar()) fail(key, "must be a duration such as 30s, 5m or 24h");
  std::string s = n.as<std::string>();
  int64_t unit = 1;
  if (!s.empty() && (s.back() == 's' || s.back() == 'm' || s.back() == 'h')) {
    unit = s.back() == 'h' ? 3600 : s.back() == 'm' ? 60 : 1;
    s.pop_back();
  }
  if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos)
    fail(key, "must be a duration such as 30s, 5m or 24h (or integer seconds)");
  int64_t v = std::stoll(s) * unit;
  if (v < min || v > max)
    fail(key, "must be between " + std::to_string(min) + " and " + std::to_string(max) + " seconds");
  return v;
}

// keyring.vault: where the vault strategy reads the keyring (a Vault KV v2 secret). The token is
// in a file (read at start-up), never in the config itself.
void parse_keyring_vault(const YAML::Node& v, const std::string& base_dir, Config::Keyring::Vault& out) {
  check_keys(v, "keyring.vault", "keyring.vault");
  if (!v["address"]) fail("keyring.vault.address", "is required (the Vault server's URL, e.g. https://vault:8200)");
  out.address = str(v["address"], "keyring.vault.address");
  static const std::regex url(R"(^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?/?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?/?$)");
  if (!std::regex_match(out.address, url))
    fail("keyring.vault.address", "must be an http:// or https:// URL with a host and optional port, and no path");
  if (out.address.back() == '/') out.address.pop_back();
  // Mount and path go into the request path as they are: segments of [A-Za-z0-9._-].
  auto segments = [](const std::string& key, std::string s) {
    while (!s.empty() && s.front() == '/') s.erase(0, 1);
    while (!s.empty() && s.back() == '/') s.pop_back();
    static const std::regex seg(R"(^[A-Za-z0-9_\-][A-Za-z0-9._\-]*(/[A-Za-z0-9_\-][A-Za-z0-9._\-]*)*$)");
    if (s.size() > 512 || !std::regex_match(s, seg))
      fail(key, "must be one or more /-separated segments of [A-Za-z0-9._-] (not starting with a dot)");
    return s;
  };
  if (v["mount"]) out.mount = segments("keyring.vault.mount", str(v["mount"], "keyring.vault.mount"));
  if (!v["path"]) fail("keyring.vault.path", "is required (the secret's path under the mount, e.g. keyring)");
  out.path = segments("keyring.vault.path", str(v["path"], "keyring.vault.path"));
  if (!v["token_file"])
    fail("keyring.vault.token_file", "is required (a file holding the Vault token; never put the token in the config)");
  std::string tf = str(v["token_file"], "keyring.vault.token_file");
  if (tf.empty()) fail("keyring.vault.token_file", "must not be empty");
  out.token_file = absolute(tf, base_dir);
  if (v["ca_file"]) {
    std::string ca = str(v["ca_file"], "keyring.vault.ca_file");
    if (ca.empty()) fail("keyring.vault.ca_file", "must not be empty");
    if (out.address.rfind("https://", 0) != 0) fail("keyring.vault.ca_file", "applies to an https:// address only");
    out.ca_file = absolute(ca, base_dir);
  }
}

void parse_tokens(const YAML::Node& tokens, Config& c) {
  if (!tokens.IsSequence()) fail("auth.tokens", "must be a list");
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::string where = "auth.tokens[" + std::to_string(i) + "]";
    const auto& t = tokens[i];
    check_keys(t, "auth.tokens[]", where);
    policy::TokenEntry e;
    e.name = t["name"] ? str(t["name"], where + ".name") : "token-" + std::to_string(i);
    if (!t["token_sha256"]) fail(where + ".token_sha256", "is required (`p11kms token hash` prints it)");
    auto h = policy::parse_token_hash(str(t["token_sha256"], where + ".token_sha256"));
    if (!h) fail(where + ".token_sha256", "must be 64 hex characters (the SHA-256 of the token)");
    e.sha256 = *h;
    if (t["policies"]) e.policies = string_list(t["policies"], where + ".policies");
    if (t["namespaces"]) e.namespaces = string_list(t["namespaces"], where + ".namespaces");
    if (t["expires"]) e.expires = parse_rfc3339(str(t["expires"], where + ".expires"), where + ".expires");
    if (t["cert_sha256"]) {
      // An mTLS client certificate whose fingerprint this is authenticates as this token.
      auto fp = policy::parse_cert_fingerprint(str(t["cert_sha256"], where + ".cert_sha256"));
      if (!fp)
        fail(where + ".cert_sha256",
             "must be the SHA-256 fingerprint of a client certificate: 64 hex digits, or AB:CD:... as "
             "`openssl x509 -noout -fingerprint -sha256` prints it");
      for (const auto& other : c.tokens)
        if (other.cert_sha256 == fp)
          fail(where + ".cert_sha256", "is already bound to token \"" + other.name + "\"");
      e.cert_sha256 = *fp;
    }
    c.tokens.push_back(std::move(e));
  }
}

// policies: {name: [{path, capabilities: [...]}, ...]}
void parse_policies(const YAML::Node& node, Config& c) {
  if (!node.IsMap()) fail("policies", "must be a mapping of policy names to lists of rules");
  for (const auto& kv : node) {
    std::string name = kv.first.as<std::string>();
    std::string where = "policies." + name;
    if (policy::is_builtin_policy(name)) fail(where, "is a built-in policy and cannot be redefined");
    if (!kv.second.IsSequence()) fail(where, "must be a list of {path, capabilities} rules");
    policy::Policy p{name, {}};
    for (size_t i = 0; i < kv.second.size(); ++i) {
      const auto& rule = kv.second[i];
      std::string rw = where + "[" + std::to_string(i) + "]";
      if (!rule.IsMap()) fail(rw, "must be a mapping with path and capabilities");
      for (const auto& rk : rule) {
        std::string k = rk.first.as<std::string>();
        if (k != "path" && k != "capabilities") throw ConfigError("config: unknown key \"" + rw + "." + k + "\"");
      }
      if (!rule["path"]) fail(rw + ".path", "is required");
      std::string path = str(rule["path"], rw + ".path");
      if (path.empty() || (path.find('*') != std::string::npos && path.find('*') != path.size() - 1))
        fail(rw + ".path", "must be non-empty, with * only at the end");
      if (!rule["capabilities"]) fail(rw + ".capabilities", "is required");
      policy::Capabilities caps = 0;
      for (const auto& cn : string_list(rule["capabilities"], rw + ".capabilities")) {
        auto cap = policy::parse_capability(cn);
        if (!cap) fail(rw + ".capabilities", "unknown capability \"" + cn + "\" (create, read, update, delete, list, sudo, deny)");
        caps |= *cap;
      }
      p.rules.push_back({path, caps});
    }
    c.policies[name] = std::move(p);
  }
}

}  // namespace

Config parse_config_tree(const std::string& text, const std::string& base_dir);

Config parse_config(const std::string& text, const std::string& base_dir) {
  try {
    return parse_config_tree(text, base_dir);
  } catch (const YAML::Exception& e) {
    // e.g. a mapping key that is not a scalar (found by the fuzzer): still a config error.
    throw ConfigError(std::string("config: invalid YAML: ") + e.what());
  }
}

Config parse_config_tree(const std::string& text, const std::string& base_dir) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw ConfigError(std::string("config: invalid YAML: ") + e.what());
  }
  Config c;
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  check_keys(root, "", "");

  if (auto l = root["listen"]) {
    check_keys(l, "listen", "listen");
    if (l["address"]) c.listen_address = str(l["address"], "listen.address");
    if (c.listen_address.find(':') == std::string::npos) fail("listen.address", "must be host:port");
    if (auto t = l["tls"]; t && !t.IsNull()) {
      check_keys(t, "listen.tls", "listen.tls");
      if (!t["cert_file"]) fail("listen.tls.cert_file", "is required for TLS");
      if (!t["key_file"]) fail("listen.tls.key_file", "is required for TLS");
      c.tls.cert_file = absolute(str(t["cert_file"], "listen.tls.cert_file"), base_dir);
      c.tls.key_file = absolute(str(t["key_file"], "listen.tls.key_file"), base_dir);
      if (t["client_ca_file"]) c.tls.client_ca_file = absolute(str(t["client_ca_file"], "listen.tls.client_ca_file"), base_dir);
    }
    if (l["threads"]) c.http_threads = static_cast<size_t>(integer(l["threads"], "listen.threads", 2, 1024));
    if (l["handler_threads"])
      c.http_handler_threads = static_cast<size_t>(integer(l["handler_threads"], "listen.handler_threads", 0, 1024));
  }
  if (auto h = root["hsm"]) {
    check_keys(h, "hsm", "hsm");
    if (h["module"]) c.hsm.module = str(h["module"], "hsm.module");
    if (h["token_label"]) c.hsm.token_label = str(h["token_label"], "hsm.token_label");
    if (h["pin_file"]) {
      std::string f = str(h["pin_file"], "hsm.pin_file");
      if (f.empty()) fail("hsm.pin_file", "must not be empty");
      c.hsm.pin_file = absolute(f, base_dir);
    }
    if (h["pin_env"]) {
      c.hsm.pin_env = str(h["pin_env"], "hsm.pin_env");
      if (c.hsm.pin_env.empty()) fail("hsm.pin_env", "must not be empty");
    }
    if (h["sessions"]) c.hsm.sessions = static_cast<size_t>(integer(h["sessions"], "hsm.sessions", 1, 1024));
    if (h["session_copies"]) c.hsm.session_copies = boolean(h["session_copies"], "hsm.session_copies");
    if (h["serialize_batches"]) c.hsm.serialize_batches = auto_boolean(h["serialize_batches"], "hsm.serialize_batches");
    if (h["compose_gcm"]) c.hsm.compose_gcm = auto_boolean(h["compose_gcm"], "hsm.compose_gcm");
  }
  if (!c.hsm.pin_file.empty() && !c.hsm.pin_env.empty()) fail("hsm", "set pin_file or pin_env, not both");
  if (c.hsm.pin_file.empty() && c.hsm.pin_env.empty()) fail("hsm", "pin_file or pin_env is required (the token's user PIN)");
  if (c.hsm.module.find('/') != std::string::npos) c.hsm.module = absolute(c.hsm.module, base_dir);

  if (auto s = root["store"]) {
    check_keys(s, "store", "store");
    if (s["driver"]) c.store.driver = str(s["driver"], "store.driver");
    if (c.store.driver != "sqlite" && c.store.driver != "postgres") fail("store.driver", "must be sqlite or postgres");
    if (s["path"]) c.store.path = str(s["path"], "store.path");
    if (s["dsn"]) c.store.dsn = str(s["dsn"], "store.dsn");
    if (s["password_file"]) c.store.password_file = absolute(str(s["password_file"], "store.password_file"), base_dir);
    if (c.store.driver == "postgres") {
      if (c.store.dsn.empty()) fail("store.dsn", "is required with store.driver postgres (a libpq connection string)");
      // Secrets never sit in the config file: the password comes from a file or PGPASSFILE.
      if (c.store.dsn.find("password") != std::string::npos)
        fail("store.dsn", "must not hold a password: use store.password_file or PGPASSFILE");
      if (s["path"]) fail("store.path", "applies to the sqlite driver only");
    } else if (s["dsn"] || s["password_file"]) {
      fail(s["dsn"] ? "store.dsn" : "store.password_file", "applies to the postgres driver only");
    }
  }
  c.store.path = absolute(c.store.path, base_dir);

  if (auto a = root["auth"]) {
    check_keys(a, "auth", "auth");
    if (a["tokens"]) parse_tokens(a["tokens"], c);
  }
  if (c.tokens.empty()) fail("auth.tokens", "at least one token is required");
  // A binding that could never match is a mistake to report, not a token to keep silently.
  for (size_t i = 0; i < c.tokens.size(); ++i)
    if (c.tokens[i].cert_sha256 && c.tls.client_ca_file.empty())
      fail("auth.tokens[" + std::to_string(i) + "].cert_sha256",
           "needs listen.tls.client_ca_file: without client certificates no connection can present it");

  if (auto p = root["policies"]; p && !p.IsNull()) parse_policies(p, c);
  for (size_t i = 0; i < c.tokens.size(); ++i)
    for (const auto& name : c.tokens[i].policies)
      if (!policy::is_builtin_policy(name) && !c.policies.count(name))
        fail("auth.tokens[" + std::to_string(i) + "].policies",
             "unknown policy \"" + name + "\" (built-in: root, kms-viewer, kms-editor, kms-admin; or define it under policies)");
  if (auto a = root["audit"]; a && !a.IsNull()) {
    check_keys(a, "audit", "audit");
    if (!a["path"]) fail("audit.path", "is required when audit is configured");
    std::string path = str(a["path"], "audit.path");
    if (path.empty()) fail("audit.path", "must not be empty");
    c.audit.path = absolute(path, base_dir);
    // Each instance appends to its own file, so each has its own chain and head in the shared
    // store: by default named after the host and the file, the same for `audit verify` run
    // there with this config.
    if (a["chain"]) {
      c.audit.chain = str(a["chain"], "audit.chain");
      bool ok = !c.audit.chain.empty() && c.audit.chain.size() <= 256;
      for (char ch : c.audit.chain) ok = ok && ch > ' ' && ch != 0x7f;
      if (!ok) fail("audit.chain", "must be 1 to 256 printable characters without spaces");
    } else {
      char host[256] = {};
      if (::gethostname(host, sizeof host - 1) != 0) host[0] = 0;
      c.audit.chain = std::string(host[0] ? host : "localhost") + ":" + c.audit.path;
    }
    if (a["fail_closed"]) c.audit.fail_closed = boolean(a["fail_closed"], "audit.fail_closed");
    if (a["max_bytes"]) c.audit.max_bytes = static_cast<uint64_t>(integer(a["max_bytes"], "audit.max_bytes", 1024, 1LL << 40));
  }
  if (auto k = root["keyring"]; k && !k.IsNull()) {
    check_keys(k, "keyring", "keyring");
    if (k["strategy"]) {
      c.keyring.strategy = str(k["strategy"], "keyring.strategy");
      if (c.keyring.strategy != "cluster" && c.keyring.strategy != "vault") fail("keyring.strategy", "must be cluster or vault");
    }
    if (auto v = k["vault"]; v && !v.IsNull()) {
      if (c.keyring.strategy != "vault") fail("keyring.vault", "applies to keyring.strategy vault only");
      parse_keyring_vault(v, base_dir, c.keyring.vault);
    } else if (c.keyring.strategy == "vault") {
      fail("keyring.vault", "is required with keyring.strategy vault ({address, mount, path, token_file, ca_file})");
    }
    if (k["recipient_public_key_file"])
      c.keyring.recipient_public_key_file =
          absolute(str(k["recipient_public_key_file"], "keyring.recipient_public_key_file"), base_dir);
  }
  if (auto j = root["jwks"]; j && !j.IsNull()) {
    check_keys(j, "jwks", "jwks");
    if (j["public"]) c.limits.jwks_public = boolean(j["public"], "jwks.public");
  }
  if (auto b = root["byok"]; b && !b.IsNull()) {
    check_keys(b, "byok", "byok");
    if (b["region"]) {
      c.byok.region = str(b["region"], "byok.region");
      if (c.byok.region.empty() || c.byok.region.size() > 64 ||
          c.byok.region.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
              std::string::npos)
        fail("byok.region", "must be 1 to 64 characters of [A-Za-z0-9._-]");
    }
    if (b["validation_interval"])
      c.byok.validation_interval_s = duration(b["validation_interval"], "byok.validation_interval", 1, 7 * 86400);
    if (b["in_use_window"]) c.byok.in_use_window_s = duration(b["in_use_window"], "byok.in_use_window", 1, 366 * 86400);
    if (b["max_keys"]) c.byok.max_keys = static_cast<size_t>(integer(b["max_keys"], "byok.max_keys", 1, 1000000));
  }

  if (auto cl = root["cluster"]; cl && !cl.IsNull()) {
    check_keys(cl, "cluster", "cluster");
    if (cl["intent_lease"]) c.cluster.intent_lease_s = duration(cl["intent_lease"], "cluster.intent_lease", 1, 86400);
    if (cl["heartbeat"]) c.cluster.heartbeat_s = duration(cl["heartbeat"], "cluster.heartbeat", 1, 3600);
    if (cl["sweep_interval"]) c.cluster.sweep_interval_s = duration(cl["sweep_interval"], "cluster.sweep_interval", 1, 86400);
    // Leases are renewed by heartbeats, so one must outlast the gap between two of them.
    if (c.cluster.intent_lease_s <= c.cluster.heartbeat_s)
      fail("cluster.intent_lease", "must be longer than cluster.heartbeat (" + std::to_string(c.cluster.heartbeat_s) +
                                       " s), which renews it");
  }

  if (auto l = root["limits"]) {
    check_keys(l, "limits", "limits");
    if (l["max_body_bytes"]) c.limits.max_body_bytes = integer(l["max_body_bytes"], "limits.max_body_bytes", 1024, 1LL << 30);
    if (l["max_json_depth"]) c.limits.max_json_depth = integer(l["max_json_depth"], "limits.max_json_depth", 2, 1000);
    if (l["max_batch_items"]) c.limits.max_batch_items = integer(l["max_batch_items"], "limits.max_batch_items", 1, 1000000);
    if (l["max_header_bytes"]) c.limits.max_header_bytes = integer(l["max_header_bytes"], "limits.max_header_bytes", 1024, 1 << 20);
    if (l["max_key_name_length"]) c.max_key_name_length = integer(l["max_key_name_length"], "limits.max_key_name_length", 1, 1024);
    if (l["read_timeout_s"]) c.read_timeout_s = integer(l["read_timeout_s"], "limits.read_timeout_s", 1, 3600);
    if (auto rl = l["rate_limit"]) {
      if (!rl.IsMap()) fail("limits.rate_limit", "must be a mapping with requests_per_second and burst");
      for (const auto& kv : rl) {
        std::string k = kv.first.as<std::string>();
        if (k != "requests_per_second" && k != "burst")
          throw ConfigError("config: unknown key \"limits.rate_limit." + k + "\"");
      }
      if (!rl["requests_per_second"]) fail("limits.rate_limit.requests_per_second", "is required");
      policy::RateLimit r;
      r.requests_per_second =
          static_cast<double>(integer(rl["requests_per_second"], "limits.rate_limit.requests_per_second", 1, 1000000));
      r.burst = rl["burst"] ? static_cast<double>(integer(rl["burst"], "limits.rate_limit.burst", 1, 10000000))
                            : r.requests_per_second;
      c.limits.rate_limit = r;
    }
  }
  return c;
}

Config load_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError("config: cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string base = fs::absolute(fs::path(path)).parent_path().string();
  Config c = parse_config(ss.str(), base);
  c.source_file = fs::absolute(fs::path(path)).string();
  return c;
}

hsm::SecretString read_secret_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot read secret file " + path);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!s.empty() && s.back() == '\n') s.pop_back();
  if (!s.empty() && s.back() == '\r') s.pop_back();
  hsm::SecretString out(s);
  OPENSSL_cleanse(s.data(), s.size());
  return out;
}

hsm::SecretString read_pin(const Config::Hsm& h) {
  if (!h.pin_file.empty()) {
    auto pin = read_secret_file(h.pin_file);
    if (pin.empty()) throw ConfigError("config: hsm.pin_file: " + h.pin_file + " is empty");
    return pin;
  }
  const char* v = std::getenv(h.pin_env.c_str());
  if (!v || !*v) throw ConfigError("config: hsm.pin_env: environment variable " + h.pin_env + " is not set");
  return hsm::SecretString(v);
}

}  // namespace p11kms::app
