#include "app/token_options.hpp"

namespace p11kms::app {

hsm::TokenOptions token_options(const Config::Hsm& config, const hsm::SessionPool& pool) {
  hsm::TokenOptions o;
  o.session_copies = config.session_copies;
  o.serialize_batches = config.serialize_batches.value_or(hsm::serializes_calls_in_process(pool.library_manufacturer()));
  return o;
}

}  // namespace p11kms::app
