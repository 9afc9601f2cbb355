#include "app/token_options.hpp"

namespace p11kms::app {

hsm::TokenOptions token_options(const Config::Hsm& config, const hsm::SessionPool& pool) {
  hsm::TokenOptions o;
  o.session_copies = config.session_copies;
  const bool serializes = hsm::serializes_calls_in_process(pool.library_manufacturer());
  o.compose_gcm = config.compose_gcm.value_or(serializes && pool.capabilities()->has(CKM_AES_ECB, CKF_ENCRYPT));
  // The gate pays off when an item's C_EncryptInit holds the module's locks; with AES-GCM
  // composed an item spends ~0.3 us in the module, and a batch waiting at the gate leaves a
  // core idle (measured: batches of 100 and 1,000 at c64 ran 1.2x faster without it).
  o.serialize_batches = config.serialize_batches.value_or(serializes && !o.compose_gcm);
  return o;
}

}  // namespace p11kms::app
