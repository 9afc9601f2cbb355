#include "app/token_options.hpp"

namespace p11kms::app {

hsm::TokenOptions token_options(const Config::Hsm& config, const hsm::SessionPool& pool) {
  hsm::TokenOptions o;
  o.session_copies = config.session_copies;
  const bool serializes = hsm::serializes_calls_in_process(pool.library_manufacturer());
  o.serialize_batches = config.serialize_batches.value_or(serializes);
  o.compose_gcm = config.compose_gcm.value_or(serializes && pool.capabilities()->has(CKM_AES_ECB, CKF_ENCRYPT));
  return o;
}

}  // namespace p11kms::app
