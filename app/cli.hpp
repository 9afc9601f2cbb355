// Command-line entry: `p11kms server|version|help|token hash|hsm init-token`.
#pragma once

namespace p11kms::app {

// Returns the process exit code: 0 ok, 1 runtime failure, 2 bad usage or config.
int run_cli(int argc, char** argv);

}  // namespace p11kms::app
