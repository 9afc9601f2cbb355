// Fuzz target: keys/envelope.hpp's parse_transit_ciphertext, the parser every decrypt and
// rewrap runs on client-supplied "vault:v<N>:<base64>" text before the token sees it.
// Beyond "no crash, no sanitizer report": it throws only KeyError(invalid_argument), what it
// accepts has a positive version, a 12-byte IV and at least a 16-byte tag, and formatting the
// parsed parts gives back text that parses to the same parts.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "keys/envelope.hpp"
#include "keys/errors.hpp"

namespace keys = p11kms::keys;

namespace {
void check(bool ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "fuzz envelope: property violated: %s\n", what);
    abort();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  keys::TransitCiphertext ct;
  try {
    ct = keys::parse_transit_ciphertext(text);
  } catch (const keys::KeyError& e) {
    check(e.kind() == keys::ErrorKind::invalid_argument, "a bad ciphertext must be an invalid_argument error");
    return 0;
  }
  check(ct.version >= 1, "accepted version < 1");
  check(ct.iv.size() == 12, "IV is not 12 bytes");
  check(ct.sealed.size() >= 16, "sealed part shorter than the GCM tag");
  auto again = keys::parse_transit_ciphertext(keys::format_transit_ciphertext(ct.version, ct.iv, ct.sealed));
  check(again.version == ct.version && again.iv == ct.iv && again.sealed == ct.sealed,
        "parse(format(parse(x))) != parse(x)");
  return 0;
}
