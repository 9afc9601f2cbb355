// Token initialization for operators and dev mode: C_InitToken + C_InitPIN on a free slot.
#pragma once

#include <string>

#include "hsm/secret.hpp"

namespace p11kms::hsm {

enum class InitResult { initialized, reinitialized, already_initialized };

struct InitTokenRequest {
  std::string module;  // path or p11-kit module name
  std::string label;
  SecretString so_pin;
  SecretString user_pin;
  bool force = false;  // re-initialize an existing token with this label (destroys its objects)
};

// Idempotent: an existing token with the label is left untouched unless force is set; its
// user PIN is checked so a mismatch is reported instead of discovered at server start.
// Throws std::runtime_error with an operator-readable message on failure.
InitResult init_token(const InitTokenRequest& request);

}  // namespace p11kms::hsm
