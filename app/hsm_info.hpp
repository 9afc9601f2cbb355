// `p11kms hsm info -config FILE`: the module, the token, its mechanisms with their flags and
// the capability table p11kms derives from them (hsm/capabilities.hpp).
#pragma once

#include <ostream>

#include "app/config.hpp"
#include "hsm/capabilities.hpp"

namespace p11kms::app {

// Prints the description; exit status 0.
void print_hsm_info(std::ostream& out, const hsm::TokenDescription& d);
// Reads the token named by the config (no PIN needed) and prints it; 1 with a message on
// stderr when the module or token cannot be read.
int run_hsm_info(const Config& config);

}  // namespace p11kms::app
