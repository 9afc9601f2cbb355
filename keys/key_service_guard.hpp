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
