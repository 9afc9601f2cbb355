#include "keys/envelope.hpp"

#include "common/encoding.hpp"
#include "keys/errors.hpp"

namespace p11kms::keys {

std::string format_transit_ciphertext(int version, const std::vector<uint8_t>& iv,
                                      const std::vector<uint8_t>& sealed) {
  std::vector<uint8_t> blob;  // one string and one buffer: a batch formats one per item
  blob.reserve(iv.size() + sealed.size());
  blob.insert(blob.end(), iv.begin(), iv.end());
  blob.insert(blob.end(), sealed.begin(), sealed.end());
  std::string out;
  out.reserve(20 + 4 * ((blob.size() + 2) / 3));
  out += "vault:v";
  out += std::to_string(version);
  out += ':';
  encoding::base64_append(out, blob.data(), blob.size());
  return out;
}

TransitCiphertext parse_transit_ciphertext(const std::string& text) {
  if (text.empty()) throw invalid("missing ciphertext to decrypt");
  if (text.rfind("vault:", 0) != 0) throw invalid("invalid ciphertext: no prefix (expected vault:v<N>:<base64>)");
  auto second = text.find(':', 6);
  if (second == std::string::npos || text.find(':', second + 1) != std::string::npos)
    throw invalid("invalid ciphertext: wrong number of fields (expected vault:v<N>:<base64>)");
  std::string ver = text.substr(6, second - 6);
  if (ver.size() < 2 || ver[0] != 'v' || ver.size() > 10 ||
      ver.find_first_not_of("0123456789", 1) != std::string::npos)
    throw invalid("invalid ciphertext: version number could not be decoded");
  TransitCiphertext out;
  out.version = std::stoi(ver.substr(1));
  if (out.version < 1) throw invalid("invalid ciphertext: version number could not be decoded");
  auto blob = encoding::base64_decode(text.substr(second + 1));
  if (!blob) throw invalid("invalid ciphertext: could not decode base64");
  if (blob->size() < 12 + 16) throw invalid("invalid ciphertext: too short to be an AES-GCM ciphertext");
  out.iv.assign(blob->begin(), blob->begin() + 12);
  out.sealed.assign(blob->begin() + 12, blob->end());
  return out;
}

std::string format_wrap_ciphertext(int version, const std::vector<uint8_t>& iv, const std::vector<uint8_t>& sealed) {
  std::vector<uint8_t> blob{0x01, static_cast<uint8_t>(version >> 24), static_cast<uint8_t>(version >> 16),
                            static_cast<uint8_t>(version >> 8), static_cast<uint8_t>(version)};
  blob.insert(blob.end(), iv.begin(), iv.end());
  blob.insert(blob.end(), sealed.begin(), sealed.end());
  return encoding::base64_encode(blob);
}

WrapCiphertext parse_wrap_ciphertext(const std::string& text) {
  if (text.empty()) throw invalid("ciphertext is required: the base64 wrapped key returned by wrap");
  auto blob = encoding::base64_decode(text);
  if (!blob) throw invalid("invalid ciphertext: not valid base64");
  if (blob->size() < 5 + 12 + 16 || (*blob)[0] != 0x01)
    throw invalid("invalid ciphertext: not a ciphertext made by wrap");
  uint32_t v = (uint32_t{(*blob)[1]} << 24) | (uint32_t{(*blob)[2]} << 16) | (uint32_t{(*blob)[3]} << 8) | (*blob)[4];
  if (v < 1 || v > 0x7fffffff) throw invalid("invalid ciphertext: bad key version");
  WrapCiphertext out;
  out.version = static_cast<int>(v);
  out.iv.assign(blob->begin() + 5, blob->begin() + 17);
  out.sealed.assign(blob->begin() + 17, blob->end());
  return out;
}

namespace {
void append_prefixed(std::vector<uint8_t>& out, const std::string& s) {
  out.push_back(static_cast<uint8_t>(s.size() >> 8));
  out.push_back(static_cast<uint8_t>(s.size()));
  out.insert(out.end(), s.begin(), s.end());
}
}  // namespace

std::vector<uint8_t> wrap_aad(const std::string& key_id, const std::vector<std::string>& aad) {
  std::vector<uint8_t> out;
  append_prefixed(out, "p11kms/kms-wrap/1");
  append_prefixed(out, key_id);
  out.push_back(static_cast<uint8_t>(aad.size() >> 8));
  out.push_back(static_cast<uint8_t>(aad.size()));
  for (const auto& a : aad) append_prefixed(out, a);
  return out;
}

std::vector<uint8_t> sealed_material_aad(const std::string& ns, const std::string& key_id, int version) {
  std::vector<uint8_t> out;
  append_prefixed(out, "p11kms/sealed-material/1");
  append_prefixed(out, ns);
  append_prefixed(out, key_id);
  append_prefixed(out, std::to_string(version));
  return out;
}

}  // namespace p11kms::keys
