// What the token's PKCS#11 module can do, known up front: its mechanisms and their flags
// (C_GetMechanismList + C_GetMechanismInfo, read at connect and after every reconnect), and
// from them which key types and operations p11kms can run inside the token, each with the
// mechanisms (and flags) it needs. Modules differ: p11-kit's remoting (p11-kit-client.so in
// front of `p11-kit server`, 0.24) drops CKM_AES_GCM, CKM_AES_KEY_WRAP(_PAD), CKM_EDDSA,
// CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_AES_ECB_ENCRYPT_DATA, ... while CKM_ECDSA, CKM_RSA_PKCS(_PSS)
// and the CKM_SHA*_HMAC family pass. A request whose capability is missing is refused by name
// (see refusal()), never done outside the token.
//
// Equivalents with custody unchanged are part of the table rather than fallbacks: signatures
// always use the raw mechanisms over a digest the service computes (CKM_ECDSA, CKM_RSA_PKCS_PSS,
// CKM_RSA_PKCS over a DigestInfo), never CKM_SHA*_ECDSA / CKM_SHA*_RSA_PKCS(_PSS), so a module
// that lacks the combined mechanisms still signs with the key in the token. Verification uses
// the public key only, so it needs no mechanism.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "hsm/pkcs11.hpp"

namespace p11kms::hsm {

struct MechanismInfo {
  CK_MECHANISM_TYPE type = 0;
  CK_ULONG min_key_size = 0;
  CK_ULONG max_key_size = 0;
  CK_FLAGS flags = 0;
};

// "CKM_AES_GCM"; unknown types as "CKM_0x...".
std::string mechanism_name(CK_MECHANISM_TYPE type);
// The usage flags of `flags` by name, in a fixed order: "encrypt,decrypt,sign,verify,
// generate,generate_key_pair,wrap,unwrap,derive" (those set); "-" when none is.
std::string mechanism_flag_names(CK_FLAGS flags);

// One mechanism a capability needs, with the flags it needs on it and, for key generation, the
// key size (bits for RSA; 0 = any).
struct MechanismNeed {
  CK_MECHANISM_TYPE type = 0;
  CK_FLAGS flags = 0;
  CK_ULONG key_size = 0;
  // "CKM_AES_GCM (encrypt,decrypt)", "CKM_RSA_PKCS_KEY_PAIR_GEN (generate_key_pair, 4096-bit)".
  std::string describe() const;
};

enum class CapabilityKind { key_type, operation };

struct Capability {
  CapabilityKind kind = CapabilityKind::operation;
  std::string name;         // key types: "aes256-gcm96", ...; operations: "encrypt/decrypt", ...
  std::string description;  // one line, for `hsm info`
  std::vector<MechanismNeed> needs;
  // Other sets of needs, each of which also makes the capability available when `needs` is not
  // met (tried in order): e.g. exportable keys, sealed with AES-GCM or else with AES-CTR over
  // CKM_AES_ECB plus HMAC-SHA-256 (keys/master_seal.hpp). Empty for most capabilities.
  std::vector<std::vector<MechanismNeed>> alternatives;
  // The needs the module does not meet; empty = available (`needs` or an alternative is met).
  // When none is met these are the ones `needs` lacks.
  std::vector<MechanismNeed> missing;

  bool available() const { return missing.empty(); }
  // "key type ed25519", "operation encrypt/decrypt": how health lists it.
  std::string id() const;
};

// Capability names, for callers.
namespace cap {
inline constexpr const char* kAes128 = "aes128-gcm96";
inline constexpr const char* kAes256 = "aes256-gcm96";
inline constexpr const char* kEcdsaP256 = "ecdsa-p256";
inline constexpr const char* kEcdsaP384 = "ecdsa-p384";
inline constexpr const char* kEd25519 = "ed25519";
inline constexpr const char* kRsa2048 = "rsa-2048";
inline constexpr const char* kRsa3072 = "rsa-3072";
inline constexpr const char* kRsa4096 = "rsa-4096";
inline constexpr const char* kHmac = "hmac";
inline constexpr const char* kDerived = "derived";        // key type: derived AES keys
inline constexpr const char* kExportable = "exportable";  // key type: material sealed under the master key
inline constexpr const char* kImport = "import";          // key type: Vault secure import (BYOK)

inline constexpr const char* kEncrypt = "encrypt/decrypt";
inline constexpr const char* kSignEcdsa = "sign ecdsa";
inline constexpr const char* kSignEd25519 = "sign ed25519";
inline constexpr const char* kSignRsaPss = "sign rsa-pss";
inline constexpr const char* kSignRsaPkcs1 = "sign rsa-pkcs1v15";
inline constexpr const char* kHmacOp = "hmac";
inline constexpr const char* kWrap = "wrap/unwrap";
inline constexpr const char* kDerive = "derive";
inline constexpr const char* kConvergent = "convergent encryption";
inline constexpr const char* kImportOp = "import";
}  // namespace cap

class Capabilities {
 public:
  Capabilities();  // an empty module: nothing available
  explicit Capabilities(std::vector<MechanismInfo> mechanisms);

  const std::vector<MechanismInfo>& mechanisms() const { return mechanisms_; }
  const std::vector<Capability>& table() const { return table_; }

  // The mechanism is offered with every flag in `flags` (0: offered at all).
  bool has(CK_MECHANISM_TYPE type, CK_FLAGS flags = 0) const;
  std::optional<MechanismInfo> info(CK_MECHANISM_TYPE type) const;

  const Capability* find(CapabilityKind kind, const std::string& name) const;
  bool available(CapabilityKind kind, const std::string& name) const;
  // Every capability the module lacks, as Capability::id() strings, in table order.
  std::vector<std::string> unavailable() const;

  // Empty when available; else a message naming the request and the missing mechanisms:
  // "<what> needs CKM_X (flags), which the token's PKCS#11 module does not offer; p11kms
  // never does it outside the token". An unknown capability name counts as missing.
  std::string refusal(CapabilityKind kind, const std::string& name, const std::string& what) const;

 private:
  std::vector<MechanismNeed> missing_of(const std::vector<MechanismNeed>& needs) const;

  std::vector<MechanismInfo> mechanisms_;  // sorted by type
  std::vector<Capability> table_;
};

// What `p11kms hsm info` prints: the module, the token and its mechanisms.
struct TokenDescription {
  std::string module_path;
  std::string library_description;  // CK_INFO
  std::string library_manufacturer;
  std::string library_version;      // "2.6"
  std::string cryptoki_version;     // "2.40"
  CK_SLOT_ID slot = 0;
  std::string label, serial, model, manufacturer;  // CK_TOKEN_INFO
  std::vector<MechanismInfo> mechanisms;
};
// Loads the module (a path or a p11-kit module name), finds the initialized token by label and
// reads its mechanisms; no login. Throws std::runtime_error naming what failed.
TokenDescription describe_token(const std::string& module, const std::string& label);

// Reads the slot's mechanism list and each mechanism's info. Throws Pkcs11Error when the list
// cannot be read; a mechanism whose info cannot be read is kept with no flags (so it counts as
// offered for nothing).
std::vector<MechanismInfo> read_mechanisms(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot);

}  // namespace p11kms::hsm
