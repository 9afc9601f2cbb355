// Vault's secrets-engine mounts for the transit type: `transit/` always exists, and operators
// enable more (`payments/`), each a separate key space. Mounts live in the store, per
// namespace, so they survive restarts and every instance sees the same ones.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "keys/key_service.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

struct Mount {
  std::string path;  // without the trailing '/', e.g. "payments"
  std::string type = "transit";
  std::string description;
  std::string uuid;
  std::string accessor;  // "transit_" + 8 hex, as Vault shows it
  int64_t created_at = 0;
};

class MountRegistry {
 public:
  static constexpr const char* kDefaultPath = "transit";

  MountRegistry(store::MetadataStore& store, KeyService& keys) : store_(store), keys_(keys) {}

  // 400 for a bad path or a type other than transit, 400 when the path is in use or reserved.
  Mount enable(const std::string& ns, const std::string& path, const std::string& type,
               const std::string& description);
  // The mount at path (the default transit/ included), or nullopt.
  std::optional<Mount> find(const std::string& ns, const std::string& path);
  // transit/ first, then the enabled mounts by path.
  std::vector<Mount> list(const std::string& ns);
  // Destroys every key of the mount (their token objects too), then the mount itself; returns
  // how many keys were destroyed. 400 for transit/ itself; a path with no mount is left as is
  // (0), as Vault does.
  size_t disable(const std::string& ns, const std::string& path);

  // Where a mount's keys live in the store: the namespace itself for transit/, else
  // "<namespace>/<path>" ('/' never appears in a namespace, so the two never collide).
  static std::string keyspace(const std::string& ns, const std::string& path);
  // A mount path as the API takes it: trailing '/' removed; 400 unless 1-64 of [A-Za-z0-9._-].
  static std::string normalize_path(const std::string& path);

 private:
  static std::string setting_name(const std::string& ns, const std::string& path);
  Mount default_mount(const std::string& ns);

  store::MetadataStore& store_;
  KeyService& keys_;
};

}  // namespace p11kms::keys
