#include "keys/key.hpp"

namespace p11kms::keys {

KeyType Key::type() const {
  auto t = parse_key_type(r_.type);
  if (!t) throw KeyError(ErrorKind::internal, "internal", "key \"" + r_.name + "\" has an unknown type in the store");
  return *t;
}

const store::VersionRecord& Key::encryption_version(int requested) const {
  int latest = latest_version();
  int version = requested;
  if (version == 0) version = latest;
  if (version < 0) throw invalid("key_version must not be negative");
  if (version > latest) throw invalid("requested key_version " + std::to_string(version) +
                                      " for encryption is higher than the latest key version " +
                                      std::to_string(latest));
  if (r_.min_encryption_version > 0 && version < r_.min_encryption_version)
    throw invalid("requested key_version " + std::to_string(version) +
                  " for encryption is less than the minimum encryption key version " +
                  std::to_string(r_.min_encryption_version));
  auto it = r_.versions.find(version);
  if (it == r_.versions.end()) throw invalid("key version " + std::to_string(version) + " does not exist");
  return it->second;
}

const store::VersionRecord& Key::decryption_version(int version) const {
  if (version > latest_version()) throw invalid("invalid ciphertext: version is too new");
  if (version < r_.min_decryption_version)
    throw invalid("ciphertext or signature version is disallowed by policy (too old): version " +
                  std::to_string(version) + " is below min_decryption_version " +
                  std::to_string(r_.min_decryption_version));
  auto it = r_.versions.find(version);
  if (it == r_.versions.end()) throw invalid("invalid ciphertext: key version " + std::to_string(version) + " does not exist");
  return it->second;
}

store::KeyRecord Key::with_config(const KeyConfigChange& c) const {
  store::KeyRecord next = r_;
  int latest = latest_version();
  if (c.min_decryption_version) {
    int v = *c.min_decryption_version;
    if (v < 0) throw invalid("min_decryption_version cannot be negative");
    if (v == 0) v = 1;  // as Vault: versions start at 1
    if (v < r_.min_available_version)
      throw invalid("min_decryption_version cannot be less than min_available_version (" +
                    std::to_string(r_.min_available_version) + "): older versions were trimmed");
    if (v > latest)
      throw invalid("cannot set min_decryption_version to " + std::to_string(v) +
                    ": the latest key version is " + std::to_string(latest));
    next.min_decryption_version = v;
  }
  if (c.min_encryption_version) {
    int v = *c.min_encryption_version;
    if (v < 0) throw invalid("min_encryption_version cannot be negative");
    if (v > latest)
      throw invalid("cannot set min_encryption_version to " + std::to_string(v) +
                    ": the latest key version is " + std::to_string(latest));
    next.min_encryption_version = v;
  }
  if (next.min_encryption_version > 0 && next.min_encryption_version < next.min_decryption_version)
    throw invalid("min_encryption_version (" + std::to_string(next.min_encryption_version) +
                  ") must not be less than min_decryption_version (" +
                  std::to_string(next.min_decryption_version) + ")");
  if (c.deletion_allowed) next.deletion_allowed = *c.deletion_allowed;
  if (c.exportable) {
    if (*c.exportable && !r_.exportable)
      throw invalid("key \"" + r_.name + "\" was created non-exportable and exists only inside the token: "
                    "it cannot be made exportable (create a new key with exportable set)", "not_exportable");
    if (!*c.exportable && r_.exportable) throw invalid("exportable cannot be disabled once enabled");
  }
  if (c.auto_rotate_period) {
    if (*c.auto_rotate_period < 0) throw invalid("auto_rotate_period cannot be negative");
    next.auto_rotate_period = *c.auto_rotate_period;
  }
  return next;
}

int Key::state_at(int64_t now) const {
  if (r_.state == store::kDestroyed) return store::kDestroyed;
  if (r_.expires_at != 0 && now >= r_.expires_at) return store::kDeactivated;
  return r_.state;
}

void Key::require_state_for(KeyUse use, int64_t now) const {
  int state = state_at(now);
  if (state == store::kDestroyed) throw gone("key \"" + r_.name + "\" has been deleted");
  if (state == store::kActive) return;
  if (state == store::kDeactivated && (use == KeyUse::decrypt || use == KeyUse::read_material)) return;
  std::string why = state == store::kSuspended   ? "is suspended (disabled); enable it first"
                    : state == store::kDeactivated ? "is deactivated: its expiration date has passed"
                                                   : "is not active yet";
  throw conflict("key \"" + r_.name + "\" " + why, "key_state");
}

std::string Key::label_for(int version) const {
  return "p11kms/" + r_.ns + "/" + r_.name + "/v" + std::to_string(version);
}

}  // namespace p11kms::keys
