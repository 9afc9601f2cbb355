#include "hsm/capabilities.hpp"

#include <algorithm>
#include <cstdio>

#include "hsm/errors.hpp"
#include "hsm/module.hpp"

namespace p11kms::hsm {

std::string mechanism_name(CK_MECHANISM_TYPE type) {
  switch (type) {
#define M(x) case x: return #x;
    M(CKM_RSA_PKCS_KEY_PAIR_GEN) M(CKM_RSA_PKCS) M(CKM_RSA_9796) M(CKM_RSA_X_509) M(CKM_MD5_RSA_PKCS)
    M(CKM_SHA1_RSA_PKCS) M(CKM_RSA_PKCS_OAEP) M(CKM_RSA_PKCS_PSS) M(CKM_SHA1_RSA_PKCS_PSS)
    M(CKM_SHA224_RSA_PKCS) M(CKM_SHA256_RSA_PKCS) M(CKM_SHA384_RSA_PKCS) M(CKM_SHA512_RSA_PKCS)
    M(CKM_SHA224_RSA_PKCS_PSS) M(CKM_SHA256_RSA_PKCS_PSS) M(CKM_SHA384_RSA_PKCS_PSS) M(CKM_SHA512_RSA_PKCS_PSS)
    M(CKM_DSA_KEY_PAIR_GEN) M(CKM_DSA) M(CKM_DSA_SHA1) M(CKM_DSA_SHA224) M(CKM_DSA_SHA256) M(CKM_DSA_SHA384)
    M(CKM_DSA_SHA512) M(CKM_DSA_PARAMETER_GEN) M(CKM_DH_PKCS_KEY_PAIR_GEN) M(CKM_DH_PKCS_DERIVE)
    M(CKM_DH_PKCS_PARAMETER_GEN) M(CKM_GENERIC_SECRET_KEY_GEN) M(CKM_DES_KEY_GEN) M(CKM_DES_ECB) M(CKM_DES_CBC)
    M(CKM_DES_CBC_PAD) M(CKM_DES2_KEY_GEN) M(CKM_DES3_KEY_GEN) M(CKM_DES3_ECB) M(CKM_DES3_CBC) M(CKM_DES3_CBC_PAD)
    M(CKM_DES3_CMAC) M(CKM_MD5) M(CKM_MD5_HMAC) M(CKM_SHA_1) M(CKM_SHA_1_HMAC) M(CKM_SHA224) M(CKM_SHA224_HMAC)
    M(CKM_SHA256) M(CKM_SHA256_HMAC) M(CKM_SHA384) M(CKM_SHA384_HMAC) M(CKM_SHA512) M(CKM_SHA512_HMAC)
    M(CKM_EC_KEY_PAIR_GEN) M(CKM_ECDSA) M(CKM_ECDSA_SHA1) M(CKM_ECDSA_SHA224) M(CKM_ECDSA_SHA256)
    M(CKM_ECDSA_SHA384) M(CKM_ECDSA_SHA512) M(CKM_ECDH1_DERIVE) M(CKM_ECDH1_COFACTOR_DERIVE)
    M(CKM_EC_EDWARDS_KEY_PAIR_GEN) M(CKM_EDDSA) M(CKM_AES_KEY_GEN) M(CKM_AES_ECB) M(CKM_AES_CBC)
    M(CKM_AES_CBC_PAD) M(CKM_AES_CTR) M(CKM_AES_GCM) M(CKM_AES_CCM) M(CKM_AES_CMAC) M(CKM_AES_MAC)
    M(CKM_AES_KEY_WRAP) M(CKM_AES_KEY_WRAP_PAD) M(CKM_AES_ECB_ENCRYPT_DATA) M(CKM_AES_CBC_ENCRYPT_DATA)
    M(CKM_DES_ECB_ENCRYPT_DATA) M(CKM_DES_CBC_ENCRYPT_DATA) M(CKM_DES3_ECB_ENCRYPT_DATA)
    M(CKM_DES3_CBC_ENCRYPT_DATA) M(CKM_CONCATENATE_DATA_AND_BASE) M(CKM_GOSTR3410_KEY_PAIR_GEN)
    M(CKM_GOSTR3410) M(CKM_GOSTR3410_WITH_GOSTR3411) M(CKM_GOSTR3411) M(CKM_GOSTR3411_HMAC)
    M(CKM_GOST28147_KEY_GEN) M(CKM_GOST28147_ECB) M(CKM_GOST28147) M(CKM_GOST28147_MAC)
#undef M
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "CKM_0x%08lX", static_cast<unsigned long>(type));
      return buf;
    }
  }
}

namespace {

const std::pair<CK_FLAGS, const char*> kFlagNames[] = {
    {CKF_ENCRYPT, "encrypt"}, {CKF_DECRYPT, "decrypt"}, {CKF_SIGN, "sign"},
    {CKF_VERIFY, "verify"},   {CKF_GENERATE, "generate"}, {CKF_GENERATE_KEY_PAIR, "generate_key_pair"},
    {CKF_WRAP, "wrap"},       {CKF_UNWRAP, "unwrap"},   {CKF_DERIVE, "derive"},
};

MechanismNeed need(CK_MECHANISM_TYPE type, CK_FLAGS flags, CK_ULONG key_size = 0) {
  return MechanismNeed{type, flags, key_size};
}

Capability make(CapabilityKind kind, std::string name, std::string description, std::vector<MechanismNeed> needs,
                std::vector<std::vector<MechanismNeed>> alternatives = {}) {
  Capability c;
  c.kind = kind;
  c.name = std::move(name);
  c.description = std::move(description);
  c.needs = std::move(needs);
  c.alternatives = std::move(alternatives);
  return c;
}

// Every key type and operation p11kms runs in the token, with what it needs. Signatures use the
// raw mechanisms over a digest computed by the service (see the header), so the combined
// CKM_SHA*_ECDSA / CKM_SHA*_RSA_PKCS(_PSS) mechanisms are never needed.
std::vector<Capability> table_template() {
  using K = CapabilityKind;
  const auto aes_gen = need(CKM_AES_KEY_GEN, CKF_GENERATE);
  const auto gcm = need(CKM_AES_GCM, CKF_ENCRYPT | CKF_DECRYPT);
  const auto ec_gen = need(CKM_EC_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR);
  const auto ecdsa = need(CKM_ECDSA, CKF_SIGN);
  const auto ed_gen = need(CKM_EC_EDWARDS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR);
  const auto eddsa = need(CKM_EDDSA, CKF_SIGN);
  const auto rsa_sign = need(CKM_RSA_PKCS, CKF_SIGN);
  const auto hmac_gen = need(CKM_GENERIC_SECRET_KEY_GEN, CKF_GENERATE);
  const auto hmac = need(CKM_SHA256_HMAC, CKF_SIGN);
  const auto derive = need(CKM_AES_ECB_ENCRYPT_DATA, CKF_DERIVE);
  const auto oaep = need(CKM_RSA_PKCS_OAEP, CKF_UNWRAP);
  const auto kwp = need(CKM_AES_KEY_WRAP_PAD, CKF_UNWRAP);
  return {
      make(K::key_type, cap::kAes128, "AES-128 keys: generated in the token, AES-GCM", {aes_gen, gcm}),
      make(K::key_type, cap::kAes256, "AES-256 keys (transit, KMS root keys): generated in the token, AES-GCM",
           {aes_gen, gcm}),
      make(K::key_type, cap::kEcdsaP256, "ECDSA P-256 key pairs: generated and signing in the token", {ec_gen, ecdsa}),
      make(K::key_type, cap::kEcdsaP384, "ECDSA P-384 key pairs: generated and signing in the token", {ec_gen, ecdsa}),
      make(K::key_type, cap::kEd25519, "Ed25519 key pairs: generated and signing in the token", {ed_gen, eddsa}),
      make(K::key_type, cap::kRsa2048, "RSA-2048 key pairs: generated and signing in the token",
           {need(CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 2048), rsa_sign}),
      make(K::key_type, cap::kRsa3072, "RSA-3072 key pairs: generated and signing in the token",
           {need(CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 3072), rsa_sign}),
      make(K::key_type, cap::kRsa4096, "RSA-4096 key pairs: generated and signing in the token",
           {need(CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 4096), rsa_sign}),
      make(K::key_type, cap::kHmac, "HMAC keys: generic secrets generated in the token", {hmac_gen, hmac}),
      make(K::key_type, cap::kDerived, "derived AES keys (Vault derived): C_DeriveKey per context, AES-GCM",
           {aes_gen, derive, gcm}),
      make(K::key_type, cap::kExportable,
           "exportable keys (Vault exportable, KMS standard/extractable): sealed under the master key with AES-GCM, "
           "or else AES-CTR (keystream by CKM_AES_ECB) and HMAC-SHA-256",
           {aes_gen, gcm}, {{aes_gen, need(CKM_AES_ECB, CKF_ENCRYPT), hmac_gen, hmac}}),
      make(K::key_type, cap::kImport, "imported keys (Vault secure import): RSA-OAEP then AES-KWP unwrap in the token",
           {need(CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 4096), oaep, kwp}),
      make(K::operation, cap::kEncrypt, "encrypt, decrypt, rewrap, data keys (AES-GCM in the token)", {gcm}),
      make(K::operation, cap::kSignEcdsa, "ECDSA signatures over a digest computed by p11kms", {ecdsa}),
      make(K::operation, cap::kSignEd25519, "Ed25519 signatures (PureEdDSA)", {eddsa}),
      make(K::operation, cap::kSignRsaPss,
           "RSA-PSS signatures: CKM_RSA_PKCS_PSS over a digest computed by p11kms (not CKM_SHA*_RSA_PKCS_PSS)",
           {need(CKM_RSA_PKCS_PSS, CKF_SIGN)}),
      make(K::operation, cap::kSignRsaPkcs1, "RSA PKCS#1 v1.5 signatures: CKM_RSA_PKCS over a DigestInfo", {rsa_sign}),
      make(K::operation, cap::kHmacOp, "HMACs in the token (sha2-256; other hashes need their CKM_SHA*_HMAC)", {hmac}),
      make(K::operation, cap::kWrap, "KMS wrap, unwrap and rewrap of data keys (AES-GCM in the token)", {gcm}),
      make(K::operation, cap::kDerive, "key derivation from a context (CKM_AES_ECB_ENCRYPT_DATA)", {derive}),
      make(K::operation, cap::kConvergent, "convergent encryption: nonce by HMAC of a derived key", {derive, hmac}),
      make(K::operation, cap::kImportOp, "Vault secure import (BYOK) into the token", {oaep, kwp}),
  };
}

}  // namespace

std::string mechanism_flag_names(CK_FLAGS flags) {
  std::string out;
  for (const auto& [flag, name] : kFlagNames) {
    if (!(flags & flag)) continue;
    if (!out.empty()) out += ',';
    out += name;
  }
  return out.empty() ? "-" : out;
}

std::string MechanismNeed::describe() const {
  std::string out = mechanism_name(type);
  std::string detail = flags ? mechanism_flag_names(flags) : "";
  if (key_size) detail += (detail.empty() ? "" : ", ") + std::to_string(key_size) + "-bit";
  if (!detail.empty()) out += " (" + detail + ")";
  return out;
}

std::string Capability::id() const {
  return std::string(kind == CapabilityKind::key_type ? "key type " : "operation ") + name;
}

Capabilities::Capabilities() : Capabilities(std::vector<MechanismInfo>{}) {}

Capabilities::Capabilities(std::vector<MechanismInfo> mechanisms) : mechanisms_(std::move(mechanisms)) {
  std::sort(mechanisms_.begin(), mechanisms_.end(),
            [](const MechanismInfo& a, const MechanismInfo& b) { return a.type < b.type; });
  table_ = table_template();
  for (auto& c : table_) {
    c.missing = missing_of(c.needs);
    for (const auto& alt : c.alternatives)
      if (!c.missing.empty() && missing_of(alt).empty()) c.missing.clear();
  }
}

std::vector<MechanismNeed> Capabilities::missing_of(const std::vector<MechanismNeed>& needs) const {
  std::vector<MechanismNeed> out;
  for (const auto& n : needs) {
    auto i = info(n.type);
    bool ok = i && (i->flags & n.flags) == n.flags;
    // Key sizes: a module that reports a range (max != 0) must cover the size.
    if (ok && n.key_size && i->max_key_size != 0) ok = n.key_size >= i->min_key_size && n.key_size <= i->max_key_size;
    if (!ok) out.push_back(n);
  }
  return out;
}

std::optional<MechanismInfo> Capabilities::info(CK_MECHANISM_TYPE type) const {
  auto it = std::lower_bound(mechanisms_.begin(), mechanisms_.end(), type,
                             [](const MechanismInfo& m, CK_MECHANISM_TYPE t) { return m.type < t; });
  if (it == mechanisms_.end() || it->type != type) return std::nullopt;
  return *it;
}

bool Capabilities::has(CK_MECHANISM_TYPE type, CK_FLAGS flags) const {
  auto i = info(type);
  return i && (i->flags & flags) == flags;
}

const Capability* Capabilities::find(CapabilityKind kind, const std::string& name) const {
  for (const auto& c : table_)
    if (c.kind == kind && c.name == name) return &c;
  return nullptr;
}

bool Capabilities::available(CapabilityKind kind, const std::string& name) const {
  const Capability* c = find(kind, name);
  return c && c->available();
}

std::vector<std::string> Capabilities::unavailable() const {
  std::vector<std::string> out;
  for (const auto& c : table_)
    if (!c.available()) out.push_back(c.id());
  return out;
}

std::string Capabilities::refusal(CapabilityKind kind, const std::string& name, const std::string& what) const {
  const Capability* c = find(kind, name);
  if (c && c->available()) return "";
  if (!c) return what + " is not something the token's PKCS#11 module is known to support";
  auto names = [](const std::vector<MechanismNeed>& needs) {
    std::string list;
    for (size_t i = 0; i < needs.size(); ++i) {
      if (i) list += i + 1 == needs.size() ? " and " : ", ";
      list += needs[i].describe();
    }
    return list;
  };
  std::string list = names(c->missing);
  for (const auto& alt : c->alternatives) list += ", or else " + names(missing_of(alt));
  return what + " needs " + list + ", which the token's PKCS#11 module does not offer (" + c->id() +
         " is unavailable); p11kms never does it outside the token";
}

std::vector<MechanismInfo> read_mechanisms(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot) {
  CK_ULONG n = 0;
  CK_RV rv = fn->C_GetMechanismList(slot, nullptr, &n);
  if (rv != CKR_OK) throw Pkcs11Error("C_GetMechanismList", rv);
  std::vector<CK_MECHANISM_TYPE> types(n);
  rv = fn->C_GetMechanismList(slot, types.data(), &n);
  if (rv != CKR_OK) throw Pkcs11Error("C_GetMechanismList", rv);
  types.resize(n);
  std::vector<MechanismInfo> out;
  out.reserve(types.size());
  for (CK_MECHANISM_TYPE t : types) {
    CK_MECHANISM_INFO mi{};
    MechanismInfo m;
    m.type = t;
    rv = fn->C_GetMechanismInfo(slot, t, &mi);
    if (is_connection_failure(rv)) throw Pkcs11Error("C_GetMechanismInfo", rv);
    if (rv == CKR_OK) {
      m.min_key_size = mi.ulMinKeySize;
      m.max_key_size = mi.ulMaxKeySize;
      m.flags = mi.flags;
    }
    out.push_back(m);
  }
  return out;
}

TokenDescription describe_token(const std::string& module, const std::string& label) {
  Module mod(module);
  mod.initialize();
  struct Fin {
    Module& m;
    ~Fin() { m.finalize(); }
  } fin{mod};
  TokenDescription d;
  d.module_path = mod.path();
  CK_INFO info{};
  if (mod.fn()->C_GetInfo(&info) == CKR_OK) {
    d.library_description = trim_padded(info.libraryDescription, sizeof info.libraryDescription);
    d.library_manufacturer = trim_padded(info.manufacturerID, sizeof info.manufacturerID);
    d.library_version = std::to_string(info.libraryVersion.major) + "." + std::to_string(info.libraryVersion.minor);
    d.cryptoki_version = std::to_string(info.cryptokiVersion.major) + "." + std::to_string(info.cryptokiVersion.minor);
  }
  auto token = mod.find_token(label);
  if (!token) throw std::runtime_error("no initialized token labelled '" + label + "' in " + mod.path());
  d.slot = token->slot;
  CK_TOKEN_INFO ti{};
  CK_RV rv = mod.fn()->C_GetTokenInfo(token->slot, &ti);
  if (rv != CKR_OK) throw Pkcs11Error("C_GetTokenInfo", rv);
  d.label = trim_padded(ti.label, sizeof ti.label);
  d.serial = trim_padded(ti.serialNumber, sizeof ti.serialNumber);
  d.model = trim_padded(ti.model, sizeof ti.model);
  d.manufacturer = trim_padded(ti.manufacturerID, sizeof ti.manufacturerID);
  d.mechanisms = read_mechanisms(mod.fn(), token->slot);
  std::sort(d.mechanisms.begin(), d.mechanisms.end(),
            [](const MechanismInfo& a, const MechanismInfo& b) { return a.type < b.type; });
  return d;
}

}  // namespace p11kms::hsm
