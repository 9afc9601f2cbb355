// Fuzz target: app/config.hpp's parse_config, the YAML loader (yaml-cpp underneath) that the
// server runs at start and on every SIGHUP reload. Its contract (DESIGN.md): any bad file is
// a ConfigError naming the key, so the CLI exits 2 with that message; any other exception
// escaping is a finding, as is a crash or sanitizer report.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <typeinfo>

#include "app/config.hpp"

namespace app = p11kms::app;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  try {
    app::Config c = app::parse_config(text, "/nonexistent/p11kms-fuzz");
    // What the server derives from an accepted file must be usable as is.
    if (c.tokens.empty() || c.store.path.empty() || c.store.path[0] != '/' ||
        (c.hsm.pin_file.empty() == c.hsm.pin_env.empty())) {
      fprintf(stderr, "fuzz config: accepted a config the server cannot use\n");
      abort();
    }
  } catch (const app::ConfigError&) {
  } catch (const std::exception& e) {
    fprintf(stderr, "fuzz config: parse_config threw %s, not ConfigError: %s\n", typeid(e).name(), e.what());
    abort();
  }
  return 0;
}
