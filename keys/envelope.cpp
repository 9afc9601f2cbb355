#include "keys/envelope.hpp"

#include "common/encoding.hpp"
#include "keys/errors.hpp"

namespace p11kms::keys {

std::string format_transit_ciphertext(int version, const std::vector<uint8_t>& iv,
                                      const std::vector<uint8_t>& sealed) {
  std::vector<uint8_t> blob(iv);
  blob.insert(blob.end(), sealed.begin(), sealed.end());
  return "vault:v" + std::to_string(version) + ":" + encoding::base64_encode(blob);
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

}  // namespace p11kms::keys
