// KeyService::probe_root_key: the BYOK registry's validation of a p11kms root key, measured in
// the token. A wrap/unwrap round trip of a fresh random DEK; it never records a use (IN_USE
// means a client's operation), and its messages are stable (the registry's `since` changes only
// when the message does), so they never carry varying details such as retry times.
#include <openssl/crypto.h>

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "common/time.hpp"
#include "hsm/errors.hpp"
#include "keys/envelope.hpp"
#include "keys/key_service.hpp"

namespace p11kms::keys {

KeyService::ProbeResult KeyService::probe_root_key(const std::string& ns, const std::string& key_id) {
  auto fail = [](std::string m) { return ProbeResult{false, std::move(m)}; };
  std::optional<store::KeyRecord> rec;
  try {
    rec = store_.get_key_by_id(ns, key_id);
  } catch (const std::exception& e) {
    log::warn(std::string("byok: validation could not read the store: ") + e.what());
    return fail("the metadata store is unavailable");
  }
  if (!rec) return fail("p11kms key " + key_id + " was deleted: it no longer exists in namespace " + ns);
  const std::string who = "p11kms key \"" + rec->name + "\" (" + rec->id + ")";
  Key key(*rec);
  switch (key.state_at(timefmt::now_unix())) {
    case store::kDestroyed: return fail(who + " was deleted: its material is destroyed");
    case store::kSuspended: return fail(who + " is disabled");
    case store::kDeactivated: return fail(who + " expired at " + timefmt::format_rfc3339(rec->expires_at));
    case store::kPreActive: return fail(who + " is not active yet");
    default: break;
  }
  if (!is_aes(key.type()) || rec->exportable || rec->versions.empty())
    return fail(who + " is not a root key (a non-exportable AES key)");
  const store::VersionRecord& v = rec->versions.rbegin()->second;
  auto object_id = encoding::hex_decode(v.object_id);
  if (v.object_id.empty() || !object_id) return fail(who + " has no token object for its latest version");
  try {
    // Drawn first: an unreachable token fails here, before any question about its mechanisms.
    hsm::SecureBytes dek = token_.random_secret(kGeneratedDekBytes);
    // Wrap and unwrap are AES-GCM in the token; a module without it cannot serve this key's
    // wraps, so the key is not usable through it, whatever else the module can do with it.
    if (!token_.supports_aes_gcm())
      return fail(who + " cannot wrap or unwrap through this PKCS#11 module: it does not offer CKM_AES_GCM");
    // The same envelope as Key Protect's wrap, then unwrapped with the same version.
    Wrapped w = wrap_with(key, dek.data(), dek.size(), {});
    auto ct = parse_wrap_ciphertext(w.ciphertext);
    auto wrapped_by = encoding::hex_decode(rec->versions.at(w.version).object_id);
    if (!wrapped_by) return fail(who + " has no token object for version " + std::to_string(w.version));
    auto pt = token_.aes_gcm_decrypt(*wrapped_by, ct.iv, wrap_aad(rec->id, {}), ct.sealed.data(), ct.sealed.size());
    if (!pt || pt->size() != dek.size() || CRYPTO_memcmp(pt->data(), dek.data(), dek.size()) != 0)
      return fail(who + ": a test key wrapped in the token did not unwrap to the same bytes");
    return ProbeResult{true, ""};
  } catch (const hsm::TokenUnavailable&) {
    return fail("the token is unreachable");
  } catch (const hsm::ObjectMissing&) {
    return fail(who + " was destroyed: its token object is missing");
  } catch (const hsm::Pkcs11Error& e) {
    if (hsm::is_connection_failure(e.rv())) return fail("the token is unreachable");
    if (e.rv() == CKR_KEY_HANDLE_INVALID || e.rv() == CKR_OBJECT_HANDLE_INVALID)
      return fail(who + " was destroyed: its token object is missing");
    return fail(who + ": the token refused the round trip (" + hsm::rv_name(e.rv()) + ")");
  } catch (const KeyError& e) {
    if (e.kind() == ErrorKind::unavailable) return fail("the token is unreachable");
    return fail(who + ": " + e.what());
  }
}

}  // namespace p11kms::keys
