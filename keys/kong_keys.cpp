#include "keys/kong_keys.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <algorithm>
#include <chrono>

#include <nlohmann/json.hpp>

#include "common/encoding.hpp"
#include "common/json_text.hpp"
#include "common/log.hpp"
#include "common/uuid.hpp"
#include "keys/errors.hpp"
#include "keys/jose.hpp"
#include "keys/signing.hpp"

namespace p11kms::keys {
namespace {

using json = nlohmann::json;

int64_t now_s() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}
using json_text::dump;

std::string p(const std::string& ns) { return "kong/" + ns + "/"; }
std::string set_key(const std::string& ns, const std::string& id) { return p(ns) + "sets/" + id; }
std::string set_name_key(const std::string& ns, const std::string& n) { return p(ns) + "set-names/" + n; }
std::string key_key(const std::string& ns, const std::string& id) { return p(ns) + "keys/" + id; }
std::string key_name_key(const std::string& ns, const std::string& n) { return p(ns) + "key-names/" + n; }
std::string kid_key(const std::string& ns, const std::string& set, const std::string& kid) {
  return p(ns) + "kids/" + set + "/" + encoding::hex_encode(reinterpret_cast<const uint8_t*>(kid.data()), kid.size());
}

json tags_json(const std::optional<std::vector<std::string>>& t) { return t ? json(*t) : json(nullptr); }
std::optional<std::vector<std::string>> tags_of(const json& j) {
  if (!j.is_array()) return std::nullopt;
  return j.get<std::vector<std::string>>();
}

bool looks_like_uuid(const std::string& s) {
  if (s.size() != 36) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return false;
    } else if (!std::isxdigit(static_cast<unsigned char>(c))) {
      return false;
    }
  }
  return true;
}

void validate_kong_name(KeyService& keys, const std::string& name, const std::string& field) {
  try {
    keys.validate_name(name);
  } catch (const KeyError& e) {
    throw invalid(e.what(), "invalid_" + field);
  }
  if (looks_like_uuid(name)) throw invalid("must not be a UUID (a UUID names the id)", "invalid_" + field);
}

json set_to_json(const KongKeySet& s) {
  return {{"id", s.id}, {"name", s.name}, {"tags", tags_json(s.tags)}, {"created_at", s.created_at},
          {"updated_at", s.updated_at}};
}
KongKeySet set_from_json(const json& j) {
  KongKeySet s;
  s.id = j.at("id");
  s.name = j.at("name");
  s.tags = tags_of(j.value("tags", json(nullptr)));
  s.created_at = j.at("created_at");
  s.updated_at = j.at("updated_at");
  return s;
}
json key_to_json(const KongKey& k) {
  return {{"id", k.id},         {"name", k.name},           {"kid", k.kid},       {"set_id", k.set_id},
          {"tags", tags_json(k.tags)}, {"created_at", k.created_at}, {"updated_at", k.updated_at},
          {"pem_form", k.pem_form}, {"public_jwk", k.public_jwk}, {"public_pem", k.public_pem},
          {"object_id", k.object_id}, {"kty", k.kty}, {"crv", k.crv}, {"alg", k.alg}, {"use", k.use},
          {"bits", k.bits}};
}
KongKey key_from_json(const json& j) {
  KongKey k;
  k.id = j.at("id");
  k.name = j.at("name");
  k.kid = j.at("kid");
  k.set_id = j.value("set_id", "");
  k.tags = tags_of(j.value("tags", json(nullptr)));
  k.created_at = j.at("created_at");
  k.updated_at = j.at("updated_at");
  k.pem_form = j.value("pem_form", false);
  k.public_jwk = j.at("public_jwk");
  k.public_pem = j.at("public_pem");
  k.object_id = j.value("object_id", "");
  k.kty = j.value("kty", "");
  k.crv = j.value("crv", "");
  k.alg = j.value("alg", "");
  k.use = j.value("use", "");
  k.bits = j.value("bits", 0);
  return k;
}

KeyError unique_violation(const std::string& field, const std::string& value) {
  return conflict("UNIQUE violation detected on '{" + field + "=\"" + value + "\"}'", "unique_" + field);
}

}  // namespace

bool kong_name_taken(store::MetadataStore& store, const std::string& ns, const std::string& name) {
  return store.get_setting(key_name_key(ns, name)).has_value();
}

KongKeys::KongKeys(store::MetadataStore& store, KeyService& keys, hsm::Token& token)
    : store_(store), keys_(keys), token_(token) {}

// -- storage ------------------------------------------------------------------------------

void KongKeys::save_set(const std::string& ns, const KongKeySet& s) { store_.put_setting(set_key(ns, s.id), dump(set_to_json(s))); }
void KongKeys::save_key(const std::string& ns, const KongKey& k) { store_.put_setting(key_key(ns, k.id), dump(key_to_json(k))); }

std::optional<KongKeySet> KongKeys::load_set(const std::string& ns, const std::string& id) {
  auto v = store_.get_setting(set_key(ns, id));
  if (!v) return std::nullopt;
  return set_from_json(json::parse(*v));
}
std::optional<KongKey> KongKeys::load_key(const std::string& ns, const std::string& id) {
  auto v = store_.get_setting(key_key(ns, id));
  if (!v) return std::nullopt;
  return key_from_json(json::parse(*v));
}

std::optional<KongKeySet> KongKeys::find_set(const std::string& ns, const std::string& x) {
  if (looks_like_uuid(x)) return load_set(ns, x);
  auto id = store_.get_setting(set_name_key(ns, x));
  return id ? load_set(ns, *id) : std::nullopt;
}
KongKeySet KongKeys::get_set(const std::string& ns, const std::string& x) {
  auto s = find_set(ns, x);
  if (!s) throw not_found("Not found");
  return *s;
}
std::optional<KongKey> KongKeys::find_key(const std::string& ns, const std::string& x) {
  if (looks_like_uuid(x)) return load_key(ns, x);
  auto id = store_.get_setting(key_name_key(ns, x));
  return id ? load_key(ns, *id) : std::nullopt;
}
KongKey KongKeys::get_key(const std::string& ns, const std::string& x) {
  auto k = find_key(ns, x);
  if (!k) throw not_found("Not found");
  return *k;
}

std::vector<KongKeySet> KongKeys::list_sets(const std::string& ns) {
  std::vector<KongKeySet> out;
  for (const auto& [name, value] : store_.list_settings(p(ns) + "sets/")) out.push_back(set_from_json(json::parse(value)));
  return out;  // sorted by setting name, i.e. by id
}
std::vector<KongKey> KongKeys::list_keys(const std::string& ns, const std::optional<std::string>& set_id) {
  std::vector<KongKey> out;
  for (const auto& [name, value] : store_.list_settings(p(ns) + "keys/")) {
    auto k = key_from_json(json::parse(value));
    if (!set_id || k.set_id == *set_id) out.push_back(std::move(k));
  }
  return out;
}

// -- key sets -----------------------------------------------------------------------------

KongKeySet KongKeys::create_set(const std::string& ns, const KongSetInput& in) {
  if (!in.name) throw invalid("required field missing", "invalid_name");
  validate_kong_name(keys_, *in.name, "name");
  std::lock_guard<std::mutex> lk(mu_);
  KongKeySet s;
  s.id = uuid::new_v4();
  s.name = *in.name;
  s.tags = in.tags;
  s.created_at = s.updated_at = now_s();
  if (store_.put_setting_if_absent(set_name_key(ns, s.name), s.id) != s.id) throw unique_violation("name", s.name);
  save_set(ns, s);
  return s;
}

std::pair<KongKeySet, bool> KongKeys::put_set(const std::string& ns, const std::optional<std::string>& x,
                                              const KongSetInput& in) {
  std::optional<KongKeySet> old;
  KongSetInput eff = in;
  if (x) {
    old = find_set(ns, *x);
    if (!old && !looks_like_uuid(*x)) {
      if (in.name && *in.name != *x) throw invalid("must match the name in the URL", "invalid_name");
      eff.name = *x;
    }
  } else {
    if (!in.name) throw invalid("required field missing", "invalid_name");
    old = find_set(ns, *in.name);
  }
  if (!old) {
    if (x && looks_like_uuid(*x)) {
      if (!eff.name) throw invalid("required field missing", "invalid_name");
      validate_kong_name(keys_, *eff.name, "name");
      std::lock_guard<std::mutex> lk(mu_);
      KongKeySet s{*x, *eff.name, eff.tags, now_s(), now_s()};
      if (store_.put_setting_if_absent(set_name_key(ns, s.name), s.id) != s.id) throw unique_violation("name", s.name);
      save_set(ns, s);
      return {s, true};
    }
    return {create_set(ns, eff), true};
  }
  // Replace: every field from the request (absent tags: null), the name possibly changed.
  KongKeySet s = *old;
  std::string name = eff.name ? *eff.name : s.name;
  validate_kong_name(keys_, name, "name");
  std::lock_guard<std::mutex> lk(mu_);
  if (name != s.name) {
    if (store_.put_setting_if_absent(set_name_key(ns, name), s.id) != s.id) throw unique_violation("name", name);
    store_.delete_setting(set_name_key(ns, s.name));
    s.name = name;
  }
  s.tags = eff.tags;
  s.updated_at = now_s();
  save_set(ns, s);
  return {s, false};
}

KongKeySet KongKeys::patch_set(const std::string& ns, const std::string& x, const KongSetInput& in) {
  KongKeySet s = get_set(ns, x);
  std::lock_guard<std::mutex> lk(mu_);
  if (in.name && *in.name != s.name) {
    validate_kong_name(keys_, *in.name, "name");
    if (store_.put_setting_if_absent(set_name_key(ns, *in.name), s.id) != s.id) throw unique_violation("name", *in.name);
    store_.delete_setting(set_name_key(ns, s.name));
    s.name = *in.name;
  }
  if (in.tags_given) s.tags = in.tags;
  s.updated_at = now_s();
  save_set(ns, s);
  return s;
}

bool KongKeys::delete_set(const std::string& ns, const std::string& x) {
  auto s = find_set(ns, x);
  if (!s) return false;
  std::lock_guard<std::mutex> lk(mu_);
  for (const auto& k : list_keys(ns, s->id)) erase_key(ns, k);
  store_.delete_setting(set_key(ns, s->id));
  store_.delete_setting(set_name_key(ns, s->name));
  return true;
}

std::string KongKeys::resolve_set(const std::string& ns, const KongSetRef& ref) {
  std::optional<KongKeySet> s;
  if (ref.id) s = load_set(ns, *ref.id);
  else if (ref.name) s = find_set(ns, *ref.name);
  if (!s) throw invalid("the referenced key set does not exist", "invalid_set");
  if (ref.id && ref.name && s->name != *ref.name) throw invalid("set.id and set.name name different sets", "invalid_set");
  return s->id;
}

// -- keys ---------------------------------------------------------------------------------

void KongKeys::claim_name(const std::string& ns, const std::string& name, const std::string& id) {
  if (keys_.find_key(ns, name)) throw unique_violation("name", name);  // a transit/KMS key or alias holds it
  if (store_.put_setting_if_absent(key_name_key(ns, name), id) != id) throw unique_violation("name", name);
}
void KongKeys::claim_kid(const std::string& ns, const std::string& set_id, const std::string& kid, const std::string& id) {
  if (set_id.empty()) return;
  if (store_.put_setting_if_absent(kid_key(ns, set_id, kid), id) != id) throw unique_violation("kid", kid);
}
void KongKeys::release_key_claims(const std::string& ns, const KongKey& k) {
  if (store_.get_setting(key_name_key(ns, k.name)) == k.id) store_.delete_setting(key_name_key(ns, k.name));
  if (!k.set_id.empty() && store_.get_setting(kid_key(ns, k.set_id, k.kid)) == k.id)
    store_.delete_setting(kid_key(ns, k.set_id, k.kid));
}

void KongKeys::destroy_object(const std::string& hex) {
  if (hex.empty()) return;
  auto id = encoding::hex_decode(hex);
  if (!id) return;
  // A destroy intent first: if the process dies before the object is gone, a sweep removes it.
  store_.add_intent(keys_.object_intent(hex, "p11kms-kong", /*doomed=*/true));
  token_.destroy(*id);
  store_.remove_intent(hex);
}

void KongKeys::erase_key(const std::string& ns, const KongKey& k) {
  store_.delete_setting(key_key(ns, k.id));
  release_key_claims(ns, k);
  destroy_object(k.object_id);
}

KongKey KongKeys::store_key(const std::string& ns, const std::optional<KongKey>& old, KongKey next, KongKeyInput& in,
                            bool material_given) {
  jose::ParsedKey parsed;
  if (material_given) {
    if (in.jwk && in.pem_given && (in.pem_public || in.pem_private))
      throw invalid("give either jwk or pem, not both", "invalid_jwk");
    if (in.jwk) {
      parsed = jose::parse_jwk(in.jwk->reveal(), next.kid);
      next.pem_form = false;
    } else if (in.pem_given && (in.pem_public || in.pem_private)) {
      parsed = jose::parse_pem(in.pem_public, in.pem_private ? &*in.pem_private : nullptr);
      next.pem_form = true;
    } else {
      throw invalid("one of jwk or pem is required", "invalid_jwk");
    }
    if (in.jwk) in.jwk->wipe();
    if (in.pem_private) in.pem_private->wipe();
    next.kty = parsed.kty;
    next.crv = parsed.crv;
    next.bits = parsed.bits;
    next.alg = parsed.alg;
    next.use = parsed.use;
    next.public_pem = public_key_pem(parsed.spki);
  } else if (old) {
    parsed.public_jwk = json::parse(old->public_jwk);
    parsed.public_jwk.erase("kid");
    parsed.public_jwk.erase("alg");
    parsed.public_jwk.erase("use");
  }
  json pub = parsed.public_jwk;
  pub["kid"] = next.kid;
  if (!next.alg.empty()) pub["alg"] = next.alg;
  if (!next.use.empty()) pub["use"] = next.use;
  next.public_jwk = dump(pub);

  // The private key: kept when the public key is unchanged, imported when new, destroyed when replaced.
  bool same_public = old && old->public_pem == next.public_pem;
  std::string new_object;
  if (same_public) {
    next.object_id = old->object_id;
    if (next.object_id.empty() && !parsed.pkcs8.empty()) new_object = "import";
  } else {
    next.object_id.clear();
    if (!parsed.pkcs8.empty()) new_object = "import";
  }
  std::lock_guard<std::mutex> lk(mu_);
  // Claims (name, kid) before anything is made; released again on failure.
  bool name_claimed = false, kid_claimed = false;
  try {
    if (!old || old->name != next.name) {
      claim_name(ns, next.name, next.id);
      name_claimed = true;
    }
    if (!next.set_id.empty() && (!old || old->set_id != next.set_id || old->kid != next.kid)) {
      claim_kid(ns, next.set_id, next.kid, next.id);
      kid_claimed = true;
    }
    if (!new_object.empty()) {
      hsm::ObjectId oid = token_.new_object_id();
      std::string hex = encoding::hex_encode(oid);
      store_.add_intent(keys_.object_intent(hex, "p11kms-kong/" + ns + "/" + next.name));
      try {
        hsm::Bytes spki = token_.import_private_key(oid, "p11kms-kong/" + ns + "/" + next.name, parsed.pkcs8);
        parsed.pkcs8.wipe();
        if (spki != parsed.spki) throw KeyError(ErrorKind::internal, "internal", "imported key's public part differs");
      } catch (const std::invalid_argument& e) {
        store_.remove_intent(hex);
        throw invalid(e.what(), next.pem_form ? "invalid_pem.private_key" : "invalid_jwk");
      } catch (...) {
        token_.destroy_own(oid);
        store_.remove_intent(hex);
        throw;
      }
      next.object_id = hex;
      try {
        // The record and the settled intent land together: a crash leaves either the key or an
        // intent whose object a sweep destroys, never a record without its object or the reverse.
        store_.put_setting_settling_intent(key_key(ns, next.id), dump(key_to_json(next)), hex);
      } catch (...) {
        token_.destroy_own(oid);
        store_.remove_intent(hex);
        throw;
      }
    } else {
      save_key(ns, next);
    }
  } catch (...) {
    if (name_claimed) store_.delete_setting(key_name_key(ns, next.name));
    if (kid_claimed) store_.delete_setting(kid_key(ns, next.set_id, next.kid));
    throw;
  }
  parsed.pkcs8.wipe();
  if (old) {
    if (old->name != next.name) store_.delete_setting(key_name_key(ns, old->name));
    if (!old->set_id.empty() && (old->set_id != next.set_id || old->kid != next.kid))
      store_.delete_setting(kid_key(ns, old->set_id, old->kid));
    if (!old->object_id.empty() && old->object_id != next.object_id) destroy_object(old->object_id);
  }
  return next;
}

KongKey KongKeys::create_key(const std::string& ns, KongKeyInput& in) {
  if (!in.name) throw invalid("required field missing", "invalid_name");
  if (!in.kid) throw invalid("required field missing", "invalid_kid");
  validate_kong_name(keys_, *in.name, "name");
  if (in.kid->empty()) throw invalid("must not be empty", "invalid_kid");
  KongKey k;
  k.id = uuid::new_v4();
  k.name = *in.name;
  k.kid = *in.kid;
  k.tags = in.tags;
  if (in.set_given && in.set.given()) k.set_id = resolve_set(ns, in.set);
  k.created_at = k.updated_at = now_s();
  return store_key(ns, std::nullopt, std::move(k), in, true);
}

std::pair<KongKey, bool> KongKeys::put_key(const std::string& ns, const std::optional<std::string>& x, KongKeyInput& in) {
  std::optional<KongKey> old;
  if (x) {
    old = find_key(ns, *x);
    if (!old && !looks_like_uuid(*x)) {
      if (in.name && *in.name != *x) throw invalid("must match the name in the URL", "invalid_name");
      in.name = *x;
    }
  } else {
    if (!in.name) throw invalid("required field missing", "invalid_name");
    old = find_key(ns, *in.name);
  }
  if (!old) {
    auto k = create_key(ns, in);
    if (x && looks_like_uuid(*x)) {
      // Kong's PUT by id creates with that id.
      std::lock_guard<std::mutex> lk(mu_);
      store_.delete_setting(key_key(ns, k.id));
      std::string fresh = k.id;
      k.id = *x;
      save_key(ns, k);
      store_.put_setting(key_name_key(ns, k.name), k.id);
      if (!k.set_id.empty()) store_.put_setting(kid_key(ns, k.set_id, k.kid), k.id);
      (void)fresh;
    }
    return {k, true};
  }
  if (!in.kid) throw invalid("required field missing", "invalid_kid");
  KongKey next = *old;
  if (in.name) {
    validate_kong_name(keys_, *in.name, "name");
    next.name = *in.name;
  }
  next.kid = *in.kid;
  next.tags = in.tags;
  next.set_id = in.set_given && in.set.given() ? resolve_set(ns, in.set) : "";
  next.updated_at = now_s();
  return {store_key(ns, old, std::move(next), in, true), false};
}

KongKey KongKeys::patch_key(const std::string& ns, const std::string& x, KongKeyInput& in) {
  KongKey old = get_key(ns, x);
  KongKey next = old;
  if (in.name) {
    validate_kong_name(keys_, *in.name, "name");
    next.name = *in.name;
  }
  if (in.kid) {
    if (in.kid->empty()) throw invalid("must not be empty", "invalid_kid");
    next.kid = *in.kid;
  }
  if (in.tags_given) next.tags = in.tags;
  if (in.set_given) next.set_id = in.set.given() ? resolve_set(ns, in.set) : "";
  next.updated_at = now_s();
  bool material = (in.jwk_given && in.jwk) || (in.pem_given && (in.pem_public || in.pem_private));
  if (!material && next.kid != old.kid && !old.pem_form) {
    // The stored JWK carries the kid: it follows the field.
  }
  return store_key(ns, old, std::move(next), in, material);
}

bool KongKeys::delete_key(const std::string& ns, const std::string& x) {
  auto k = find_key(ns, x);
  if (!k) return false;
  std::lock_guard<std::mutex> lk(mu_);
  erase_key(ns, *k);
  return true;
}

}  // namespace p11kms::keys
