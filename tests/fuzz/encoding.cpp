// Fuzz target: common/encoding.hpp's strict base64 and hex decoders (every transit field that
// carries bytes goes through base64_decode). Checks, beyond "no crash, no sanitizer report":
// whatever decodes re-encodes to something that decodes to the same bytes, and encoding then
// decoding arbitrary bytes gives them back.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/encoding.hpp"

namespace enc = p11kms::encoding;

namespace {
void check(bool ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "fuzz encoding: property violated: %s\n", what);
    abort();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);

  if (auto b = enc::base64_decode(text)) {
    check(b->size() <= size / 4 * 3, "base64_decode output longer than 3/4 of its input");
    auto again = enc::base64_decode(enc::base64_encode(*b));
    check(again && *again == *b, "base64 decode(encode(decode(x))) != decode(x)");
  }
  if (auto h = enc::hex_decode(text)) {
    check(h->size() * 2 == size, "hex_decode output is not half its input");
    auto again = enc::hex_decode(enc::hex_encode(*h));
    check(again && *again == *h, "hex decode(encode(decode(x))) != decode(x)");
  }

  std::vector<uint8_t> raw(data, data + size);
  auto b64 = enc::base64_encode(raw);
  check(b64.size() == 4 * ((size + 2) / 3), "base64_encode length");
  auto back = enc::base64_decode(b64);
  check(back && *back == raw, "base64 decode(encode(x)) != x");
  auto hex = enc::hex_encode(raw);
  auto hback = enc::hex_decode(hex);
  check(hback && *hback == raw, "hex decode(encode(x)) != x");
  return 0;
}
