// The hsm::TokenOptions a configuration asks for, resolved against the module it loaded.
#pragma once

#include "app/config.hpp"
#include "hsm/session_pool.hpp"
#include "hsm/token.hpp"

namespace p11kms::app {

// hsm.compose_gcm and hsm.serialize_batches "auto" (unset) become what the module is known to
// need: compose_gcm for a module that serializes its calls in a process
// (hsm::serializes_calls_in_process of its CK_INFO manufacturer) and offers CKM_AES_ECB for
// encryption; serialize_batches for such a module when AES-GCM is not composed.
hsm::TokenOptions token_options(const Config::Hsm& config, const hsm::SessionPool& pool);

}  // namespace p11kms::app
