// Kong Gateway's keys and key sets (/keys, /key-sets): asymmetric JWK or PEM keys grouped in
// sets, with what Kong does not have: a JWK Set per key set, JWS signing and JWE decryption with
// the private key inside the token.
//
// Custody: a private key given as a JWK (`d`) or a PEM is converted to PKCS#8 in wiped buffers
// and put into the token as a persistent, private, sensitive, non-extractable object
// (hsm::Token::import_private_key: RSA CKA_SIGN + CKA_DECRYPT, EC CKA_SIGN + CKA_DERIVE, Ed25519
// CKA_SIGN), labelled `p11kms-kong/<ns>/<name>`. The store holds only public parts.
//
// Storage: store settings (no schema change), next to the keyring's:
//   kong/<ns>/sets/<id>               = set record (JSON)
//   kong/<ns>/set-names/<name>        = set id
//   kong/<ns>/keys/<id>               = key record (JSON: public JWK, public PEM, object id)
//   kong/<ns>/key-names/<name>        = key id (KeyService refuses these names: one name space
//                                       across every dialect, see kong_name_taken)
//   kong/<ns>/kids/<set id>/<hex kid> = key id (a kid is unique within a set)
// Names are claimed with put_setting_if_absent, so two instances never both win a name. A token
// object is preceded by a committed intent (removed once its record is written), so a crash
// before the record leaves an object the start-up sweep destroys.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "hsm/secret.hpp"
#include "hsm/token.hpp"
#include "keys/key_service.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

// Whether a Kong key holds this name in the namespace (KeyService's create refuses it then).
bool kong_name_taken(store::MetadataStore& store, const std::string& ns, const std::string& name);

struct KongKeySet {
  std::string id, name;
  std::optional<std::vector<std::string>> tags;  // nullopt: Kong's null
  int64_t created_at = 0, updated_at = 0;
};

struct KongKey {
  std::string id, name, kid;
  std::string set_id;                            // "" when in no set
  std::optional<std::vector<std::string>> tags;
  int64_t created_at = 0, updated_at = 0;
  bool pem_form = false;                         // given as PEM (shown as pem) or as a JWK (shown as jwk)
  std::string public_jwk;                        // JSON text: public members, kid, alg/use when known
  std::string public_pem;                        // SubjectPublicKeyInfo PEM
  std::string object_id;                         // hex CKA_ID of the private key object; "" = public only
  std::string kty, crv, alg, use;
  int bits = 0;                                  // RSA modulus bits
};

// A set reference or a set's fields as a request gives them.
struct KongSetRef {
  std::optional<std::string> id, name;
  bool given() const { return id || name; }
};

// A key as a request gives it (POST/PUT: the whole key; PATCH: only what is present). The JWK
// and the private PEM may hold private keys: they are wiped when this object goes.
struct KongKeyInput {
  std::optional<std::string> name, kid;
  std::optional<hsm::SecretString> jwk;          // JSON text
  bool pem_given = false;                        // a pem object was given (null counts: it clears)
  std::optional<std::string> pem_public;
  std::optional<hsm::SecretString> pem_private;
  bool set_given = false;                        // `set` present (null: no set)
  KongSetRef set;
  bool tags_given = false;
  std::optional<std::vector<std::string>> tags;
  bool jwk_given = false;                        // jwk present (null counts: it clears)
};

struct KongSetInput {
  std::optional<std::string> name;
  bool tags_given = false;
  std::optional<std::vector<std::string>> tags;
};

struct KongDecrypted {
  hsm::SecureBytes plaintext;
  std::string protected_header;  // JSON text
};

class KongKeys {
 public:
  KongKeys(store::MetadataStore& store, KeyService& keys, hsm::Token& token);

  // -- key sets ---------------------------------------------------------------------------
  KongKeySet create_set(const std::string& ns, const KongSetInput& in);
  // PUT: creates (with the URL's name, or the body's) or replaces the set named/identified.
  // Returns the set and whether it was created.
  std::pair<KongKeySet, bool> put_set(const std::string& ns, const std::optional<std::string>& id_or_name,
                                      const KongSetInput& in);
  KongKeySet patch_set(const std::string& ns, const std::string& id_or_name, const KongSetInput& in);
  std::optional<KongKeySet> find_set(const std::string& ns, const std::string& id_or_name);
  KongKeySet get_set(const std::string& ns, const std::string& id_or_name);  // 404
  // Deletes the set, its keys and their token objects; false if there was none.
  bool delete_set(const std::string& ns, const std::string& id_or_name);
  std::vector<KongKeySet> list_sets(const std::string& ns);  // sorted by id

  // -- keys -------------------------------------------------------------------------------
  KongKey create_key(const std::string& ns, KongKeyInput& in);
  std::pair<KongKey, bool> put_key(const std::string& ns, const std::optional<std::string>& id_or_name,
                                   KongKeyInput& in);
  KongKey patch_key(const std::string& ns, const std::string& id_or_name, KongKeyInput& in);
  std::optional<KongKey> find_key(const std::string& ns, const std::string& id_or_name);
  KongKey get_key(const std::string& ns, const std::string& id_or_name);  // 404
  bool delete_key(const std::string& ns, const std::string& id_or_name);
  // Every key of the namespace (set_id: only that set's), sorted by id.
  std::vector<KongKey> list_keys(const std::string& ns, const std::optional<std::string>& set_id = std::nullopt);

  // -- what Kong does not have ------------------------------------------------------------
  // RFC 7517 JWK Set of the set's public keys (JSON text).
  std::string jwks(const std::string& ns, const std::string& set_id_or_name);
  // Compact JWS (RFC 7515) of payload_b64url, signed in the token; alg "" = the key's default;
  // header_json: extra protected header members (JSON object text, "" = none).
  std::string sign(const std::string& ns, const std::string& id_or_name, const std::string& payload_b64url,
                   const std::string& alg, const std::string& header_json);
  // Compact JWE (RFC 7516) decryption; the RSA or ECDH step in the token. 400 when it does not open.
  KongDecrypted decrypt(const std::string& ns, const std::string& id_or_name, const std::string& compact);

 private:
  struct Parsed;
  void save_key(const std::string& ns, const KongKey& k);
  void save_set(const std::string& ns, const KongKeySet& s);
  std::optional<KongKey> load_key(const std::string& ns, const std::string& id);
  std::optional<KongKeySet> load_set(const std::string& ns, const std::string& id);
  std::string resolve_set(const std::string& ns, const KongSetRef& ref);  // set id, 400 unknown
  // Writes `next` (a new key, or `old` replaced); imports the private key unless it is `old`'s.
  KongKey store_key(const std::string& ns, const std::optional<KongKey>& old, KongKey next, KongKeyInput& in,
                    bool key_material_given);
  void claim_name(const std::string& ns, const std::string& name, const std::string& id);
  void claim_kid(const std::string& ns, const std::string& set_id, const std::string& kid, const std::string& id);
  void release_key_claims(const std::string& ns, const KongKey& k);
  void destroy_object(const std::string& hex_id);
  void erase_key(const std::string& ns, const KongKey& k);

  store::MetadataStore& store_;
  KeyService& keys_;
  hsm::Token& token_;
  std::mutex mu_;
};

}  // namespace p11kms::keys
