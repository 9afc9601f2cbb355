// A key and its versions, with the rules that decide which version may be used for what.
// Every operation asks this object, so min-version rules are enforced in one place.
#pragma once

#include <string>

#include "keys/errors.hpp"
#include "keys/key_type.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

struct KeyConfigChange {
  std::optional<int> min_decryption_version;
  std::optional<int> min_encryption_version;
  std::optional<bool> deletion_allowed;
  // Transit: exportable can be turned on only for a key created exportable (custody: a
  // non-exportable key exists only inside the token) and never off.
  std::optional<bool> exportable;
  std::optional<int64_t> auto_rotate_period;  // seconds; 0 = off
};

// What a caller is about to do with a key; each state allows some of these.
enum class KeyUse {
  encrypt,  // encrypt, wrap, rewrap, datakey: needs an active key
  decrypt,  // decrypt, unwrap: also allowed once the key has expired (deactivated)
  rotate,   // needs an active key
  read_material,  // a standard key's payload
};

class Key {
 public:
  explicit Key(store::KeyRecord record) : r_(std::move(record)) {}

  const store::KeyRecord& record() const { return r_; }
  const std::string& name() const { return r_.name; }
  int latest_version() const { return r_.latest_version(); }
  KeyType type() const;

  // The version to encrypt with: requested (0 = default) checked against min_encryption_version
  // and latest.
  const store::VersionRecord& encryption_version(int requested) const;
  // The version a ciphertext names, checked against min_decryption_version and latest.
  const store::VersionRecord& decryption_version(int version) const;

  // Validates a config change against the versions; returns the record as it would be.
  store::KeyRecord with_config(const KeyConfigChange& change) const;

  std::string label_for(int version) const;  // CKA_LABEL: p11kms/<namespace>/<name>/v<n>

  // Key Protect's state as of `now`: a key past its expiration date is deactivated.
  int state_at(int64_t now) const;
  // 410 for a deleted key, 409 naming the state when it does not allow `use`.
  void require_state_for(KeyUse use, int64_t now) const;

 private:
  store::KeyRecord r_;
};

}  // namespace p11kms::keys
