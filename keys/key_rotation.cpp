// Automatic rotation. Policies are store settings "rotation/<ns>/<key id>" =
// "<period s> <created> <updated> <updated by>", so every instance sees them and they survive
// restarts; a key is due when its latest version is older than the period.
#include <sstream>

#include "common/log.hpp"
#include "common/time.hpp"
#include "keys/key_service.hpp"
#include "keys/key_service_guard.hpp"

namespace p11kms::keys {
namespace {

const std::string kPrefix = "rotation/";

std::string setting_name(const std::string& ns, const std::string& key_id) { return kPrefix + ns + "/" + key_id; }

KeyService::RotationPolicy parse(const std::string& value) {
  KeyService::RotationPolicy p;
  std::istringstream in(value);
  in >> p.period_s >> p.created_at >> p.updated_at;
  std::getline(in >> std::ws, p.updated_by);
  return p;
}

}  // namespace

KeyService::RotationPolicy KeyService::set_rotation_policy(const KeyRef& ref, int64_t period_s,
                                                           const std::string& updated_by) {
  return guarded([&] {
    if (period_s < 0) throw invalid("the rotation period must not be negative", "invalid_rotation_period");
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    const auto& r = key->record();
    if (period_s > 0 && !is_aes(key->type()))
      throw invalid("key \"" + ref.name + "\" is of type " + r.type + ", which is not rotated", "unsupported_operation");
    if (period_s > 0 && r.imported)
      throw invalid("key \"" + ref.name + "\" was imported: only new material can rotate it, so it cannot rotate itself",
                    "unsupported_operation");
    auto name = setting_name(r.ns, r.id);
    int64_t now = timefmt::now_unix();
    RotationPolicy p;
    if (auto old = store_.get_setting(name)) p = parse(*old);
    if (period_s == 0) {
      store_.delete_setting(name);
      return RotationPolicy{};
    }
    if (p.created_at == 0) p.created_at = now;
    p.period_s = period_s;
    p.updated_at = now;
    p.updated_by = updated_by;
    store_.put_setting(name, std::to_string(p.period_s) + " " + std::to_string(p.created_at) + " " +
                                 std::to_string(p.updated_at) + " " + updated_by);
    log::info("keys: " + r.ns + "/" + r.name + " rotates every " + std::to_string(period_s) + " s");
    return p;
  });
}

std::optional<KeyService::RotationPolicy> KeyService::rotation_policy(const std::string& ns, const std::string& key_id) {
  return guarded([&]() -> std::optional<RotationPolicy> {
    auto value = store_.get_setting(setting_name(ns, key_id));
    if (!value) return std::nullopt;
    return parse(*value);
  });
}

size_t KeyService::rotate_due(int64_t now) {
  size_t rotated = 0;
  std::vector<std::pair<std::string, std::string>> policies;
  try {
    policies = store_.list_settings(kPrefix);
  } catch (const std::exception& e) {
    log::warn(std::string("rotation: policies not read: ") + e.what());
    return 0;
  }
  for (const auto& [name, value] : policies) {
    // "rotation/<ns>/<id>": the namespace may itself hold '/' (a mount's key space).
    auto slash = name.rfind('/');
    std::string ns = name.substr(kPrefix.size(), slash - kPrefix.size()), id = name.substr(slash + 1);
    auto policy = parse(value);
    try {
      auto rec = store_.get_key_by_id(ns, id);
      if (!rec || rec->state == store::kDestroyed) {
        store_.delete_setting(name);
        continue;
      }
      Key key(*rec);
      if (policy.period_s <= 0 || key.state_at(now) != store::kActive || rec->versions.empty()) continue;
      if (rec->versions.rbegin()->second.created_at + policy.period_s > now) continue;
      rotate_key(KeyRef{ns, rec->name, id});
      ++rotated;
    } catch (const std::exception& e) {
      // The token may be away: the next pass tries again.
      log::warn("rotation: key " + ns + "/" + id + " not rotated: " + e.what());
    }
  }
  return rotated;
}

void KeyService::drop_rotation_policy(const std::string& ns, const std::string& key_id) noexcept {
  try {
    store_.delete_setting(setting_name(ns, key_id));
  } catch (const std::exception& e) {
    log::warn("keys: rotation policy of deleted key " + key_id + " not removed: " + e.what());
  }
}

}  // namespace p11kms::keys
