// Key Protect's key aliases, kept as store settings "aliases/<ns>/<alias>" = "<key id> <unix
// time> <creator>". Names and aliases share one namespace: KeyService::create_key refuses a
// name that is an alias, and an alias may not be a key's name.
#include <sstream>

#include "common/log.hpp"
#include "common/time.hpp"
#include "common/uuid.hpp"
#include "keys/key_service.hpp"
#include "keys/key_service_guard.hpp"

namespace p11kms::keys {
namespace {

std::string setting_name(const std::string& ns, const std::string& alias) { return "aliases/" + ns + "/" + alias; }

constexpr size_t kMaxAliasesPerKey = 5;  // as Key Protect

void validate_alias(const std::string& alias) {
  bool ok = alias.size() >= 2 && alias.size() <= 90;
  for (char c : alias)
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_');
  if (!ok) throw invalid("invalid alias \"" + alias + "\": 2 to 90 characters of [A-Za-z0-9_-]", "invalid_alias");
  if (uuid::looks_like_uuid(alias)) throw invalid("an alias may not have the form of a UUID", "invalid_alias");
}

KeyService::Alias parse(const std::string& alias, const std::string& value) {
  KeyService::Alias a;
  a.alias = alias;
  std::istringstream in(value);
  in >> a.key_id >> a.created_at;
  std::getline(in >> std::ws, a.created_by);
  return a;
}

}  // namespace

std::optional<std::string> KeyService::alias_target(const std::string& ns, const std::string& alias) {
  auto value = store_.get_setting(setting_name(ns, alias));
  if (!value) return std::nullopt;
  return parse(alias, *value).key_id;
}

KeyService::Alias KeyService::add_alias(const KeyRef& ref, const std::string& alias, const std::string& created_by) {
  return guarded([&] {
    validate_alias(alias);
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    const auto& id = key->record().id;
    if (auto target = alias_target(ref.ns, alias)) {
      if (*target == id) return parse(alias, *store_.get_setting(setting_name(ref.ns, alias)));  // idempotent
      throw conflict("alias \"" + alias + "\" already names another key in this namespace", "alias_in_use");
    }
    if (load(KeyRef{ref.ns, alias}))
      throw conflict("\"" + alias + "\" is the name of a key in this namespace", "alias_in_use");
    if (aliases_of(ref.ns, id).size() >= kMaxAliasesPerKey)
      throw invalid("a key has at most " + std::to_string(kMaxAliasesPerKey) + " aliases", "too_many_aliases");
    Alias a{alias, id, created_by, timefmt::now_unix()};
    store_.put_setting(setting_name(ref.ns, alias), id + " " + std::to_string(a.created_at) + " " + created_by);
    log::info("keys: alias " + alias + " added to key " + ref.ns + "/" + ref.name);
    return a;
  });
}

void KeyService::remove_alias(const KeyRef& ref, const std::string& alias) {
  guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    auto target = alias_target(ref.ns, alias);
    if (!target || *target != key->record().id)
      throw not_found("key \"" + ref.name + "\" has no alias \"" + alias + "\"");
    store_.delete_setting(setting_name(ref.ns, alias));
    return 0;
  });
}

std::vector<KeyService::Alias> KeyService::aliases_of(const std::string& ns, const std::string& key_id) {
  return guarded([&] {
    std::vector<Alias> out;
    std::string prefix = "aliases/" + ns + "/";
    for (const auto& [name, value] : store_.list_settings(prefix)) {
      auto a = parse(name.substr(prefix.size()), value);
      if (a.key_id == key_id) out.push_back(a);
    }
    return out;
  });
}

void KeyService::drop_aliases_of(const std::string& ns, const std::string& key_id) noexcept {
  try {
    for (const auto& a : aliases_of(ns, key_id)) store_.delete_setting(setting_name(ns, a.alias));
  } catch (const std::exception& e) {
    log::warn("keys: aliases of deleted key " + key_id + " not removed: " + e.what());
  }
}

}  // namespace p11kms::keys
