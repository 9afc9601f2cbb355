// Operations on token objects, over the session pool. Objects are addressed by their CKA_ID;
// handles are cached per pool generation (a SoftHSM C_FindObjects re-reads every object file,
// so a lookup per operation would not scale).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "hsm/attributes.hpp"
#include "hsm/batch_gate.hpp"
#include "hsm/composed_gcm.hpp"
#include "hsm/secret.hpp"
#include "hsm/session_pool.hpp"

namespace p11kms::hsm {

using ObjectId = std::vector<uint8_t>;  // the CKA_ID, 16 random bytes

// How an operation finds its key: a persistent token object by CKA_ID, or, when `load` is set,
// a non-extractable session object (CKA_TOKEN=false) made by `load` on first use (exportable
// keys, whose material lives sealed in the store), cached under `id` and made again when the
// session that held it has gone. `load` unseals material only on a cache miss.
struct KeyHandle {
  KeyHandle(const ObjectId& object_id) : id(object_id) {}  // NOLINT: implicit on purpose
  KeyHandle(ObjectId cache_id, std::function<AttributeTemplate()> loader)
      : id(std::move(cache_id)), load(std::move(loader)) {}
  ObjectId id;
  std::function<AttributeTemplate()> load;
  // A derived key (Vault's derived keys): a non-extractable session object made in the token by
  // C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA, base, derive_data), cached under `id` like a loaded
  // one and derived again when its session has gone. Made by derived_key_handle().
  std::shared_ptr<const KeyHandle> base;
  Bytes derive_data;                     // a multiple of 16 bytes
  CK_KEY_TYPE derived_type = CKK_AES;    // CKK_AES (encrypt/decrypt) or CKK_GENERIC_SECRET (sign)
  size_t derived_bytes = 32;
};

// The handle of a key derived from `base` with `data` (16 or 32 bytes, e.g. a hash of a
// context): an AES key usable to encrypt and decrypt (derived_type CKK_AES) or a generic
// secret usable only for HMAC (CKK_GENERIC_SECRET). The base must have CKA_DERIVE.
KeyHandle derived_key_handle(ObjectId cache_id, KeyHandle base, Bytes data, CK_KEY_TYPE type, size_t bytes);

// A wrapped import was refused (it does not open with the wrapping key, or holds something
// other than what was declared): the caller's fault, a 400. Nothing was left on the token.
class ImportRejected : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// What C_UnwrapKey made of an import: the object's value length (secret keys) and, for
// private keys, the public key as SubjectPublicKeyInfo DER.
struct ImportedObject {
  size_t value_len = 0;
  Bytes spki;
};

// Asymmetric key pairs the token makes.
enum class PairKind { ec_p256, ec_p384, ed25519, rsa };
struct PairSpec {
  PairKind kind = PairKind::ec_p256;
  int rsa_bits = 0;  // for rsa
};

// An exportable key pair: the private key as PKCS#8 DER (to be sealed at once) and the public
// key as SubjectPublicKeyInfo DER.
struct ExportablePair {
  SecureBytes pkcs8;
  Bytes spki;
};

// The template of a persistent secret key the service keeps (private, sensitive,
// non-extractable, only `usages` true), without a value: for C_UnwrapKey. It leaves
// CKA_MODIFIABLE out (SoftHSM's unwrap refuses it), so the object is modifiable by default.
AttributeTemplate token_secret_template(CK_KEY_TYPE type, const ObjectId& id, const std::string& label,
                                        std::initializer_list<CK_ATTRIBUTE_TYPE> usages);
// The same for a private key of `kind` (CKA_SIGN only).
AttributeTemplate token_private_key_template(PairKind kind, const ObjectId& id, const std::string& label);

// Session-object templates for material unsealed from the store: private, sensitive,
// non-extractable, CKA_TOKEN=false, only the given usage true.
AttributeTemplate session_secret_template(CK_KEY_TYPE type, const SecureBytes& value,
                                          std::initializer_list<CK_ATTRIBUTE_TYPE> usages);
// A private key (EC P-256/P-384, Ed25519 or RSA) from PKCS#8 DER, CKA_SIGN only. Throws
// std::invalid_argument if the DER is not such a key.
AttributeTemplate session_private_key_template(const SecureBytes& pkcs8);
// The SubjectPublicKeyInfo DER of a PKCS#8 private key (for imported and exportable keys).
Bytes public_key_of_pkcs8(const SecureBytes& pkcs8);

struct ObjectInfo {
  ObjectId id;
  std::string label;
  CK_OBJECT_CLASS object_class = 0;
};

struct TokenOptions {
  // Run operations on a session copy of each persistent key in use (C_CopyObject with
  // CKA_TOKEN=false: private, sensitive, non-extractable like the original, and gone with the
  // process) instead of on the token object. SoftHSM re-checks a token object's files on every
  // C_*Init (about 12 of its 17 us, docs/PERFORMANCE.md section 2), a session object's never.
  // SoftHSM copies only keys made with CKA_MODIFIABLE=true, so new secret keys and signing keys
  // are then made modifiable (CKA_SENSITIVE and CKA_EXTRACTABLE stay fixed either way); keys it
  // will not copy, such as those made while this was off, keep using the token object. Copies
  // are used only while the token was seen present within the last second.
  bool session_copies = false;
  // Let one batch at a time into the module (hsm/batch_gate.hpp), for modules that serialize
  // their calls inside a process anyway (serializes_calls_in_process).
  bool serialize_batches = false;
  // AES-GCM with a 96-bit IV (up to kComposedGcmMaxBytes) composed from the token's AES-ECB
  // (hsm/composed_gcm.hpp): each key keeps a CKM_AES_ECB encryption active on the sessions that
  // used it last, so a message costs one C_EncryptUpdate of its counter blocks, and the CTR
  // XOR and GHASH run in this process. On SoftHSM a C_EncryptInit on a private key object costs
  // several times the cipher (docs/PERFORMANCE.md section 11). The key never leaves the token;
  // what does is in docs/OPERATIONS.md section 12. Keys the module will not run AES-ECB with
  // (CKA_ALLOWED_MECHANISMS, a module without it) use CKM_AES_GCM as before.
  bool compose_gcm = false;
};

// Longer messages run CKM_AES_GCM in the token: its init is paid once per message, and the
// counter blocks would need as much memory again.
constexpr size_t kComposedGcmMaxBytes = 16 * 1024;
// A batch's counter blocks go to the token in runs of at most this many (64 KiB).
constexpr size_t kComposedBatchBlocks = 4096;

using GcmMessage = composed_gcm::Message;

// Whether a module, known by its CK_INFO manufacturerID, serializes its calls within one
// process, so that two threads gain nothing over one and lose to meeting on its locks. True
// for SoftHSM (measured: 2.6.1 runs AES-GCM on a private key at 0.9x of one thread's rate with
// two). Unknown modules are assumed to scale, as a network HSM does.
bool serializes_calls_in_process(const std::string& library_manufacturer);

class Token {
 public:
  explicit Token(SessionPool& pool, TokenOptions options = {}) : pool_(pool), options_(options) {}

  SessionPool& pool() { return pool_; }

  // Held by a request for all the token operations of its batch (BatchGate::Scope::next_item
  // before each); a no-op unless TokenOptions::serialize_batches.
  BatchGate::Scope batch_scope() { return BatchGate::Scope(options_.serialize_batches ? &batch_gate_ : nullptr); }

  Bytes random(size_t n);
  SecureBytes random_secret(size_t n);
  ObjectId new_object_id() { return random(16); }

  // A persistent, private, sensitive, non-extractable AES key usable only to encrypt and
  // decrypt. Every boolean is set explicitly (SoftHSM turns several on by default).
  void generate_aes_key(const ObjectId& id, size_t bytes, const std::string& label);
  // The base key of a derived key version: the same, usable only to derive (CKA_DERIVE).
  void generate_derivation_key(const ObjectId& id, size_t bytes, const std::string& label);

  // The same kind of AES key from caller-supplied material (C_CreateObject); the template's
  // copy of the value is wiped, the caller wipes its own.
  void import_aes_key(const ObjectId& id, const SecureBytes& value, const std::string& label);

  // A persistent, private, sensitive, non-extractable generic secret usable only to compute
  // and check HMACs (CKA_SIGN/CKA_VERIFY), e.g. the audit log's key.
  void generate_hmac_key(const ObjectId& id, size_t bytes, const std::string& label);
  // HMAC-SHA256 computed in the token with that key.
  Bytes hmac_sha256(const ObjectId& key, const uint8_t* data, size_t len);

  // A generic secret of the given value, CKA_SIGN/CKA_VERIFY only (an imported HMAC key).
  void import_hmac_key(const ObjectId& id, const SecureBytes& value, const std::string& label);
  // HMAC with mechanism CKM_SHA*_HMAC computed in the token.
  Bytes hmac(const KeyHandle& key, CK_MECHANISM_TYPE mechanism, const uint8_t* data, size_t len);

  // A persistent key pair: the private key is a token object (private, sensitive,
  // non-extractable, CKA_SIGN only); the public key is made as a session object, read and
  // destroyed. Returns the public key as SubjectPublicKeyInfo DER.
  Bytes generate_key_pair(const PairSpec& spec, const ObjectId& id, const std::string& label);
  // A key pair made by the token for an exportable key: session objects only (the private one
  // readable so it can be sealed), destroyed before returning.
  ExportablePair generate_exportable_key_pair(const PairSpec& spec);
  // A signature made in the token. CKM_ECDSA (data: a digest; result r || s), CKM_EDDSA (data:
  // the message), CKM_RSA_PKCS (data: a DigestInfo), CKM_RSA_PKCS_PSS (data: a digest;
  // params: CK_RSA_PKCS_PSS_PARAMS).
  Bytes sign(const KeyHandle& key, CK_MECHANISM_TYPE mechanism, void* params, size_t params_len,
             const uint8_t* data, size_t len);

  // AES-GCM with a 128-bit tag; returns ciphertext || tag. Composed from AES-ECB when
  // TokenOptions::compose_gcm allows (the same bytes either way).
  Bytes aes_gcm_encrypt(const KeyHandle& key, const Bytes& iv, const Bytes& aad,
                        const uint8_t* plaintext, size_t len);
  // aes_gcm_encrypt of each message under one key. Composed, a run of messages costs one
  // C_EncryptUpdate of all their counter blocks (one session, one lease) instead of one per
  // message. `turn` (batch_scope) is told of each token operation.
  std::vector<Bytes> aes_gcm_encrypt_batch(const KeyHandle& key, const std::vector<GcmMessage>& batch,
                                           BatchGate::Scope& turn);
  // nullopt when the tag does not verify (or the data is not a GCM ciphertext).
  std::optional<SecureBytes> aes_gcm_decrypt(const KeyHandle& key, const Bytes& iv, const Bytes& aad,
                                             const uint8_t* ciphertext, size_t len);
  // Raw AES-ECB encryption of whole blocks (`len` a multiple of 16, may be 0) in the token: the
  // keystream of the master seal's AES-CTR scheme (keys/master_seal.hpp) where the module lacks
  // AES-GCM. Needs only CKA_ENCRYPT on the key; the result is wiped on release.
  SecureBytes aes_ecb_encrypt(const KeyHandle& key, const uint8_t* blocks, size_t len);

  // Vault's secure import (BYOK). The wrapping key: a persistent RSA key pair whose private
  // half unwraps (and decrypts raw RSA, see import_wrapped); returns the public SPKI DER.
  Bytes generate_wrapping_key_pair(const ObjectId& id, const std::string& label, int bits);
  // Opens `blob` = RSA-OAEP(ephemeral AES key) || AES-KWP(material) with the wrapping key, both
  // layers in the token where the module allows it (`oaep_hash` CKM_SHA_1 ... CKM_SHA512; when
  // the module's OAEP refuses the hash, raw RSA runs in the token and the OAEP decoding here,
  // and the ephemeral key is put back into the token and wiped), and unwraps the material with
  // C_UnwrapKey into an object made from `target`: a secret key, or a private key of `kind`
  // (checked against the declared curve or size). Throws ImportRejected for a blob that does
  // not open or holds another kind of key; nothing is left on the token then.
  // `aes_bytes`: the declared size of an AES key (SoftHSM neither takes CKA_VALUE_LEN in an
  // unwrap template nor reports it afterwards, so the size is checked from the KWP length and a
  // trial use in the token); 0 for other secrets, whose value_len is then the KWP bound.
  ImportedObject import_wrapped(const ObjectId& wrapping_key, const Bytes& blob, CK_MECHANISM_TYPE oaep_hash,
                                AttributeTemplate& target, const PairSpec* kind, size_t aes_bytes = 0);
  // The same two layers, for an exportable import (its owner may read it anyway): the material
  // is unwrapped into a short-lived session object, read and destroyed.
  SecureBytes import_wrapped_material(const ObjectId& wrapping_key, const Bytes& blob, CK_MECHANISM_TYPE oaep_hash);
  // RSA-OAEP decryption with a persistent private key (CKA_DECRYPT) of the token (rsa_oaep.cpp):
  // C_Decrypt with CKM_RSA_PKCS_OAEP when the module takes the hash; SoftHSM 2.6.1 answers
  // CKR_ARGUMENTS_BAD for any hash but SHA-1 (measured), and then raw RSA (CKM_RSA_X_509) runs in
  // the token and only the OAEP decoding here. Throws ImportRejected when it does not open.
  // `module_oaep` (optional) tells which of the two ran.
  SecureBytes rsa_oaep_decrypt(const ObjectId& private_key, const Bytes& ciphertext, CK_MECHANISM_TYPE oaep_hash,
                               bool* module_oaep = nullptr);
  // An RSA private key (PEM: PKCS#8 or PKCS#1, >= 2048 bits) put into the token as a persistent
  // private, sensitive, non-extractable object with CKA_DECRYPT/CKA_UNWRAP only (rsa_oaep.cpp);
  // every buffer that held it is wiped. Returns the public key as SubjectPublicKeyInfo DER.
  // Throws std::invalid_argument if the PEM is not such a key.
  Bytes import_rsa_decryption_key(const ObjectId& id, const std::string& label, const SecretString& pem);
  // JOSE keys (Kong's /keys; hsm/jose_keys.cpp). A private key from PKCS#8 DER (RSA 2048-4096,
  // EC P-256/P-384/P-521, Ed25519) as a persistent private, sensitive, non-extractable token
  // object with only the usages JOSE needs: RSA CKA_SIGN + CKA_DECRYPT (RSA-OAEP), EC CKA_SIGN +
  // CKA_DERIVE (ECDH-ES), Ed25519 CKA_SIGN. Every template copy is wiped. Returns the public key
  // as SubjectPublicKeyInfo DER. Throws std::invalid_argument for any other key.
  Bytes import_private_key(const ObjectId& id, const std::string& label, const SecureBytes& pkcs8);
  // ECDH-ES: CKM_ECDH1_DERIVE (CKD_NULL) of the EC private key with the peer's uncompressed
  // point, Z a sensitive non-extractable session object, then the JWA Concat KDF (SHA-256,
  // RFC 7518 4.6.2) over Z in the token (C_DigestKey), so Z never leaves it; only the derived
  // `out_bytes` come back. Throws ImportRejected when the point is refused.
  SecureBytes ecdh_concat_kdf(const ObjectId& private_key, const Bytes& peer_point, size_t z_bytes,
                              const Bytes& other_info, size_t out_bytes);
  // The modulus size in bytes of a persistent RSA private key.
  size_t rsa_modulus_bytes(const ObjectId& private_key);
  // Drops the cached session objects (loaded or derived) whose cache id starts with `prefix`,
  // destroying them (e.g. every object of a trimmed or deleted version).
  void drop_session_objects(const ObjectId& prefix);

  // Destroys the object with this CKA_ID if present; returns whether one was destroyed. An
  // object not found is looked for again after re-reading the token (another process may have
  // made it), so none is left behind.
  bool destroy(const ObjectId& id);
  // The same for an object this process made or tried to make (a failed or lost create): it
  // would see its own object, so a miss is final and never re-reads the token.
  bool destroy_own(const ObjectId& id);
  bool exists(const ObjectId& id);

  // Every secret and private key object, with id and label (one C_FindObjects pass). Their
  // handles go into the handle cache, so the first use of each needs no search.
  std::vector<ObjectInfo> list_key_objects();

  bool has_mechanism(CK_MECHANISM_TYPE m) const { return pool_.capabilities()->has(m); }
  // The module's capability table (hsm/capabilities.hpp), current since the last (re)connect.
  std::shared_ptr<const Capabilities> capabilities() const { return pool_.capabilities(); }
  bool supports_aes_gcm() const { return pool_.capabilities()->available(CapabilityKind::operation, cap::kEncrypt); }

 private:
  void generate_secret(CK_MECHANISM_TYPE mechanism, class AttributeTemplate& t, const ObjectId& id);
  std::optional<CK_OBJECT_HANDLE> find(SessionPool::Lease& lease, const ObjectId& id);
  CK_OBJECT_HANDLE handle(SessionPool::Lease& lease, const ObjectId& id);  // throws ObjectMissing
  // find(), and on a miss once more after re-reading the token; nullopt only for a token that
  // is there (else TokenUnavailable). May move the lease to a new session.
  std::optional<CK_OBJECT_HANDLE> find_or_refresh(SessionPool::Lease& lease, const ObjectId& id);
  bool destroy(const ObjectId& id, bool maybe_foreign);
  CK_OBJECT_HANDLE resolve(SessionPool::Lease& lease, const KeyHandle& key);
  // Starts an operation (init(handle) calls C_SignInit, C_EncryptInit, ...) on the key's
  // object; a handle gone stale (the object re-made by another process, or its session object
  // lost with its session) is re-found once.
  template <typename Init>
  void init_operation(SessionPool::Lease& lease, const KeyHandle& key, Init&& init, const char* what);
  CK_OBJECT_HANDLE derive(SessionPool::Lease& lease, const KeyHandle& key);
  // The ephemeral AES key of an import (a session object, CKA_UNWRAP only) from the blob's
  // RSA part; the caller destroys it.
  CK_OBJECT_HANDLE open_ephemeral(SessionPool::Lease& lease, const ObjectId& wrapping_key, const Bytes& rsa_part,
                                  CK_MECHANISM_TYPE oaep_hash);
  void forget(const ObjectId& id);
  // Destroys every loaded or derived session object once there are kMaxSessionObjects, ending
  // their streams.
  void evict_session_objects_if_full(SessionPool::Lease& lease);
  // The AES-ECB encryption of counter_blocks (hsm/composed_gcm.hpp) on a session that keeps the
  // key's AES-ECB operation; nullopt when composing does not apply (option off, an IV not of 96
  // bits, a long message, a key the module will not run AES-ECB with).
  std::optional<SecureBytes> gcm_keystream(const KeyHandle& key, const Bytes& iv, size_t len);
  // The AES-ECB encryption of any `blocks` on such a session; nullopt for a key the module will
  // not run AES-ECB with.
  std::optional<SecureBytes> ecb_keystream(const KeyHandle& key, const Bytes& blocks);
  // Throws TokenUnavailable unless the token was seen present within kTokenPresenceRecheck:
  // session copies and kept streams outlive a token that went away.
  void require_recently_present(SessionPool::Lease& lease);
  // Destroys `copy` if it is the session copy in use for `id`; false (nothing done) otherwise.
  bool drop_copy(SessionPool::Lease& lease, const ObjectId& id, CK_OBJECT_HANDLE copy);
  // The handle to run an operation on for the token object `id`: its session copy when
  // options_.session_copies allows one, else the token object itself.
  CK_OBJECT_HANDLE copy_or_object(SessionPool::Lease& lease, const ObjectId& id);
  void drop_orphan_copies(SessionPool::Lease& lease, const std::vector<ObjectInfo>& listed);
  // Drops every cached handle when the pool's sessions were replaced (cache_mu_ held).
  void sync_generation(const SessionPool::Lease& lease);

  SessionPool& pool_;
  const TokenOptions options_;
  BatchGate batch_gate_;
  std::mutex cache_mu_;
  uint64_t cache_generation_ = 0;
  std::unordered_map<std::string, CK_OBJECT_HANDLE> cache_;
  std::mutex load_mu_;  // one creator per session object
  std::unordered_map<std::string, CK_OBJECT_HANDLE> session_cache_;  // KeyHandle::load objects
  // One maker of copies at a time; not load_mu_, which a loader holds while it unseals material
  // with the master key (itself run on a copy).
  std::mutex copy_mu_;
  std::unordered_map<std::string, CK_OBJECT_HANDLE> copies_;  // by CKA_ID (guarded by cache_mu_)
  std::unordered_set<std::string> not_copyable_;  // ids the module would not copy (cache_mu_)
  std::unordered_set<std::string> no_ecb_;  // ids the module would not run AES-ECB with (cache_mu_)
  std::atomic<int64_t> present_at_ns_{0};  // when copy_or_object last saw the token present (steady, ns)
  // Ids still missing after a refresh, and when (guarded by cache_mu_).
  std::unordered_map<std::string, std::chrono::steady_clock::time_point> confirmed_missing_;
};

}  // namespace p11kms::hsm
