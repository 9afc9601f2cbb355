// Token::aes_ecb_round_trip: the BYOK validation probe through modules without AES-GCM.
#include <openssl/crypto.h>

#include "hsm/token.hpp"

namespace p11kms::hsm {

bool Token::aes_ecb_round_trip(const KeyHandle& key, const SecureBytes& data) {
  if (data.empty() || data.size() % 16 != 0) throw std::invalid_argument("aes_ecb_round_trip: data must be whole AES blocks");
  CK_MECHANISM mech{CKM_AES_ECB, nullptr, 0};
  auto l = pool_.lease();
  for (int attempt = 0;; ++attempt) {
    CK_OBJECT_HANDLE h = resolve(l, key);
    CK_RV rv = l.fn()->C_EncryptInit(l.session(), &mech, h);
    if ((rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID) && attempt == 0) {
      forget(key.id);  // destroyed and re-found by another process
      continue;
    }
    l.check(rv, "C_EncryptInit");
    Bytes ct(data.size());
    CK_ULONG ct_len = ct.size();
    rv = l.fn()->C_Encrypt(l.session(), const_cast<uint8_t*>(data.data()), data.size(), ct.data(), &ct_len);
    if (rv != CKR_OK) l.discard();
    l.check(rv, "C_Encrypt");
    rv = l.fn()->C_DecryptInit(l.session(), &mech, h);
    l.check(rv, "C_DecryptInit");
    SecureBytes pt(ct_len);
    CK_ULONG pt_len = pt.size();
    rv = l.fn()->C_Decrypt(l.session(), ct.data(), ct_len, pt.data(), &pt_len);
    if (rv != CKR_OK) l.discard();
    l.check(rv, "C_Decrypt");
    return pt_len == data.size() && CRYPTO_memcmp(pt.data(), data.data(), pt_len) == 0;
  }
}

}  // namespace p11kms::hsm
