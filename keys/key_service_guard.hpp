// KeyService::guarded, shared by the translation units that define KeyService members
// (key_service.cpp, key_aliases.cpp). Internal to keys/.
#pragma once

#include "common/log.hpp"
#include "hsm/errors.hpp"
#include "keys/key_service.hpp"

namespace p11kms::keys {

// Turns failures of the layers below into the service's one error type: the token or the
// store being unavailable is a 503 with a message, never a crash or a 500 with internals.
template <typename F>
auto KeyService::guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const KeyError&) {
    throw;
  } catch (const hsm::ImportRejected& e) {
    throw invalid(std::string("invalid import ciphertext: ") + e.what(), "invalid_ciphertext");
  } catch (const hsm::TokenUnavailable& e) {
    throw unavailable(e.what());
  } catch (const hsm::ObjectMissing& e) {
    throw unavailable(std::string("a key version's token object is missing: ") + e.what());
  } catch (const hsm::Pkcs11Error& e) {
    // A mechanism the capability table let through but the module refuses at use (a module
    // that lists what it cannot do): the caller learns which call, not a 503.
    if (e.rv() == CKR_MECHANISM_INVALID)
      throw invalid(std::string("the token's PKCS#11 module refused the mechanism this request needs (") + e.what() +
                        "); p11kms never does it outside the token",
                    "mechanism_unavailable");
    log::error(std::string("hsm: ") + e.what());
    throw unavailable(std::string("the HSM refused the operation: ") + e.what());
  } catch (const store::ConflictError& e) {
    throw KeyError(ErrorKind::conflict, "conflict", e.what());
  } catch (const store::StoreError& e) {
    log::error(std::string("store: ") + e.what());
    throw unavailable("the metadata store is unavailable");
  }
}

}  // namespace p11kms::keys
