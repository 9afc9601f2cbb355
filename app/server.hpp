// Wiring: store + token + KeyService + API + HTTP listener, and the process's life cycle.
#pragma once

#include <string>

#include "app/config.hpp"

namespace p11kms::app {

struct DevOptions {
  std::string data_dir = "./var/dev";
  std::string listen_address = "127.0.0.1:8200";
  std::string root_token;  // random when empty
};

// Creates or reuses the dev token and store under data_dir; returns a config for them and
// sets root_token if it was empty. Prints nothing.
Config prepare_dev(DevOptions& options);

// Runs until SIGINT/SIGTERM. Returns the process exit code. banner: printed (stdout) once
// the listener is up.
int run_server(const Config& config, const std::string& banner);

}  // namespace p11kms::app
