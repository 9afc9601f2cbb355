// The YAML configuration (shape in DESIGN.md). Every key has a default; an unknown key, or a
// value for a feature this release does not have, is an error naming the key (exit 2).
#pragma once

#include <stdexcept>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "api/api_service.hpp"
#include "hsm/secret.hpp"
#include "keys/byok_registry.hpp"
#include "policy/policy.hpp"
#include "policy/token_auth.hpp"

namespace p11kms::app {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Config {
  std::string listen_address = "127.0.0.1:8200";
  struct Tls {
    std::string cert_file, key_file, client_ca_file;  // absolute after loading; empty = no TLS
  } tls;
  struct Hsm {
    std::string module = "/usr/lib/softhsm/libsofthsm2.so";
    std::string token_label = "p11kms";
    std::string pin_file;  // absolute after loading
    std::string pin_env;
    size_t sessions = 8;
    // Operations run on session copies of the keys in use (hsm::TokenOptions::session_copies).
    bool session_copies = true;
    // One batch at a time into the module (hsm::TokenOptions::serialize_batches); unset: "auto",
    // on for modules that serialize their calls anyway (SoftHSM) unless AES-GCM is composed.
    std::optional<bool> serialize_batches;
    // AES-GCM composed from the token's AES-ECB (hsm::TokenOptions::compose_gcm); unset: "auto",
    // on for modules that serialize their calls anyway (SoftHSM) and offer CKM_AES_ECB.
    std::optional<bool> compose_gcm;
  } hsm;
  struct Store {
    std::string driver = "sqlite";   // sqlite | postgres
    std::string path = "p11kms.db";  // sqlite; absolute after loading
    std::string dsn;                 // postgres: a libpq connection string, without a password
    std::string password_file;       // postgres: a file holding just the password; absolute
  } store;
  std::vector<policy::TokenEntry> tokens;
  std::map<std::string, policy::Policy> policies;  // configured ones; built-ins are implied
  std::string source_file;  // the file it came from (for reloads); empty in dev mode
  api::ApiLimits limits;
  size_t max_key_name_length = 128;
  int read_timeout_s = 30;
  struct Audit {
    std::string path;  // absolute after loading; empty = no audit log
    std::string chain;  // audit.chain; default "<hostname>:<path>": one chain head per instance
    bool fail_closed = true;
    uint64_t max_bytes = 104857600;
  } audit;
  size_t http_threads = 0;  // listen.threads; 0: one per CPU core (at least 2)
  // listen.handler_threads: the pool that runs handlers under load (api/http/types.hpp);
  // absent: as many as listener threads; 0: handlers always run on the listener threads
  std::optional<size_t> http_handler_threads;
  keys::ByokOptions byok;  // byok: region, validation_interval, in_use_window, max_keys
  struct Cluster {  // several instances on one store: intent leases, heartbeats, the sweeper
    int64_t intent_lease_s = 60;
    int64_t heartbeat_s = 5;
    int64_t sweep_interval_s = 30;
  } cluster;
  struct Keyring {
    std::string recipient_public_key_file;  // absolute after loading; empty = export answers 400
    std::string strategy = "cluster";       // cluster | vault
    struct Vault {                          // keyring.vault (strategy vault only)
      std::string address;                  // http(s)://host[:port], no trailing slash
      std::string mount = "secret";         // the KV v2 mount
      std::string path;                     // the secret's path under the mount
      std::string token_file;               // absolute; holds the Vault token (read at start-up)
      std::string ca_file;                  // absolute; optional PEM CA bundle for https
    } vault;
  } keyring;
};

Config load_config_file(const std::string& path);
Config parse_config(const std::string& yaml_text, const std::string& base_dir);

// Reads the user PIN from hsm.pin_file or hsm.pin_env; ConfigError naming the source if absent.
hsm::SecretString read_pin(const Config::Hsm& hsm);
// A secret file's content with one trailing newline stripped.
hsm::SecretString read_secret_file(const std::string& path);

}  // namespace p11kms::app
