// The keyring's vault strategy: a reader of one Vault KV version 2 secret in Kong's layout, as a
// keys::KeyringSource. This header is library-free; app/vault_kv.cpp is the only file that
// includes cpprestsdk's HTTP client (web::http::client::http_client).
#pragma once

#include <chrono>
#include <string>

#include "hsm/secret.hpp"
#include "keys/keyring.hpp"

namespace p11kms::app {

struct VaultKvOptions {
  std::string address;    // http(s)://host[:port], no trailing slash
  std::string mount;      // the KV v2 mount, e.g. "secret"
  std::string path;       // the secret's path under the mount, e.g. "keyring"
  hsm::SecretString token;  // sent as X-Vault-Token; never logged, never in a message
  std::string ca_pem;     // https: extra trusted CA certificates (PEM); empty = the system's
  std::chrono::seconds timeout{10};  // per HTTP request
};

// Each call: GET /v1/<mount>/metadata/<path> (the versions, with deletion_time and destroyed),
// then GET /v1/<mount>/data/<path>?version=N for every live version, oldest first. Blocks the
// calling thread (never call it on cpprestsdk's own pool). Errors as keys::KeyringSource says.
keys::KeyringSource vault_keyring_source(VaultKvOptions options);

// "secret/keyring at https://vault:8200": names the secret in messages and logs.
std::string describe_vault_secret(const std::string& address, const std::string& mount, const std::string& path);

}  // namespace p11kms::app
