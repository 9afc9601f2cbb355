// Automatic rotation. The period is the key's auto_rotate_period in the store, so every
// instance sees it and it survives restarts; a key is due when its latest version is older
// than the period (the store finds those in one query).
#include "common/log.hpp"
#include "common/time.hpp"
#include "keys/key_service.hpp"
#include "keys/key_service_guard.hpp"

namespace p11kms::keys {

KeyService::RotationPolicy KeyService::set_rotation_policy(const KeyRef& ref, int64_t period_s) {
  if (period_s < 0) throw invalid("the rotation period must not be negative", "invalid_rotation_period");
  KeyConfigChange change;
  change.auto_rotate_period = period_s;
  auto r = configure_key(ref, change);  // refuses keys that cannot rotate themselves
  log::info("keys: " + r.ns + "/" + r.name +
            (period_s ? " rotates every " + std::to_string(period_s) + " s" : " no longer rotates by itself"));
  return RotationPolicy{period_s, r.created_by, r.updated_at};
}

std::optional<KeyService::RotationPolicy> KeyService::rotation_policy(const std::string& ns, const std::string& key_id) {
  return guarded([&]() -> std::optional<RotationPolicy> {
    auto r = store_.get_key_by_id(ns, key_id);
    if (!r || r->state == store::kDestroyed || r->auto_rotate_period <= 0) return std::nullopt;
    return RotationPolicy{r->auto_rotate_period, r->created_by, r->updated_at};
  });
}

size_t KeyService::rotate_due(int64_t now) {
  size_t rotated = 0;
  std::vector<store::KeyRecord> due;
  try {
    due = store_.keys_due_for_rotation(now);
  } catch (const std::exception& e) {
    log::warn(std::string("rotation: due keys not read: ") + e.what());
    return 0;
  }
  for (const auto& d : due) {
    try {
      KeyRef ref{d.ns, d.name, d.id};
      auto key = load(ref);
      // A suspended or expired key waits; it is due again once it is active.
      if (!key || key->state_at(now) != store::kActive || key->record().imported) continue;
      rotate_key(ref);
      ++rotated;
    } catch (const std::exception& e) {
      // The token may be away: the next pass tries again.
      log::warn("rotation: key " + d.ns + "/" + d.name + " not rotated: " + e.what());
    }
  }
  return rotated;
}

}  // namespace p11kms::keys
