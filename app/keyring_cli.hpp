// `p11kms keyring ...` commands (keyring_cli.cpp).
#pragma once

#include <string>
#include <vector>

namespace p11kms::app {

// Returns the exit code: 0 ok, 1 runtime failure, 2 bad usage.
int cmd_keyring(const std::vector<std::string>& args);

}  // namespace p11kms::app
