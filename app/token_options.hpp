// The hsm::TokenOptions a configuration asks for, resolved against the module it loaded.
#pragma once

#include "app/config.hpp"
#include "hsm/session_pool.hpp"
#include "hsm/token.hpp"

namespace p11kms::app {

// hsm.serialize_batches and hsm.compose_gcm "auto" (unset) become what the module is known to
// need (hsm::serializes_calls_in_process of its CK_INFO manufacturer; for compose_gcm also
// CKM_AES_ECB offered for encryption).
hsm::TokenOptions token_options(const Config::Hsm& config, const hsm::SessionPool& pool);

}  // namespace p11kms::app
