// AES-GCM composed from the token's AES-ECB (hsm::TokenOptions::compose_gcm, hsm/composed_gcm.hpp)
// against a real SoftHSM token: the bytes are those of the token's own CKM_AES_GCM both ways,
// forged or altered messages are refused, the kept AES-ECB operations never get in the way of
// other operations and never outlive their key, and where composing does not apply the token's
// GCM runs.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

#include "hsm/attributes.hpp"
#include "hsm/composed_gcm.hpp"
#include "hsm/errors.hpp"
#include "hsm/token.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

hsm::TokenOptions composing() {
  hsm::TokenOptions o;
  o.session_copies = true;
  o.compose_gcm = true;
  return o;
}

hsm::Bytes pattern(size_t n, uint8_t seed) {
  hsm::Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + 31 * i);
  return b;
}

hsm::Bytes bytes(const hsm::SecureBytes& s) { return hsm::Bytes(s.data(), s.data() + s.size()); }

class ComposedGcmTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  hsm::SessionPool pool_{token_.pool_config(2)};
  hsm::Token composed_{pool_, composing()};
  hsm::Token plain_{pool_};  // CKM_AES_GCM in the token, on the token object: the reference
  hsm::Bytes iv_ = pattern(12, 5);

  hsm::ObjectId aes_key(const std::string& label) {
    auto id = composed_.new_object_id();
    composed_.generate_aes_key(id, 32, label);
    return id;
  }
};

TEST_F(ComposedGcmTest, TheBytesAreTheTokensGcmBothWays) {
  auto id = aes_key("p11kms/root/same/v1");
  const size_t lengths[] = {0, 1, 15, 16, 17, 31, 32, 33, 100, 1000, 4096, hsm::kComposedGcmMaxBytes};
  const size_t aad_lengths[] = {0, 3, 16, 17, 64};
  uint8_t seed = 0;
  for (size_t len : lengths) {
    for (size_t aad_len : aad_lengths) {
      SCOPED_TRACE("plaintext " + std::to_string(len) + " B, aad " + std::to_string(aad_len) + " B");
      auto message = pattern(len, ++seed);
      auto aad = pattern(aad_len, static_cast<uint8_t>(seed * 3));
      auto iv = pattern(12, static_cast<uint8_t>(seed * 7));
      auto mine = composed_.aes_gcm_encrypt(id, iv, aad, message.data(), message.size());
      auto theirs = plain_.aes_gcm_encrypt(id, iv, aad, message.data(), message.size());
      ASSERT_EQ(mine, theirs);
      auto opened_by_token = plain_.aes_gcm_decrypt(id, iv, aad, mine.data(), mine.size());
      ASSERT_TRUE(opened_by_token.has_value());
      EXPECT_EQ(bytes(*opened_by_token), message);
      auto opened_here = composed_.aes_gcm_decrypt(id, iv, aad, theirs.data(), theirs.size());
      ASSERT_TRUE(opened_here.has_value());
      EXPECT_EQ(bytes(*opened_here), message);
      // The assembly alone, with no way back to the token's GCM (a Mismatch throws here).
      auto blocks = hsm::composed_gcm::counter_blocks(iv, len);
      auto stream = plain_.aes_ecb_encrypt(id, blocks.data(), blocks.size());
      ASSERT_EQ(hsm::composed_gcm::seal(stream, iv, aad, message.data(), message.size()), theirs);
      auto opened = hsm::composed_gcm::open(stream, iv, aad, theirs.data(), theirs.size());
      ASSERT_TRUE(opened.has_value());
      EXPECT_EQ(bytes(*opened), message);
    }
  }
  EXPECT_GE(pool_.streams_kept(), 1u);  // it was composed, not the token's GCM under another name
}

// A batch under one key: each message's bytes are what the token's GCM makes of it alone, in
// runs of counter blocks (a run holds at most kComposedBatchBlocks), and the messages composing
// does not take (long ones, other IVs) run the token's GCM in their place.
TEST_F(ComposedGcmTest, ABatchIsEachMessagesTokenGcm) {
  auto id = aes_key("p11kms/root/batch/v1");
  std::vector<hsm::Bytes> ivs, aads, messages;
  auto add = [&](size_t len, size_t aad_len, size_t iv_len) {
    auto seed = static_cast<uint8_t>(messages.size());
    messages.push_back(pattern(len, seed));
    aads.push_back(pattern(aad_len, static_cast<uint8_t>(seed * 3)));
    ivs.push_back(pattern(iv_len, static_cast<uint8_t>(seed * 7)));
  };
  for (size_t len : {size_t{0}, size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{100}, hsm::kComposedGcmMaxBytes})
    add(len, len % 20, 12);
  add(hsm::kComposedGcmMaxBytes + 1, 5, 12);  // too long: the token's GCM
  add(32, 0, 16);                              // a 128-bit IV: the token's GCM
  for (int i = 0; i < 2000; ++i) add(32, i % 3, 12);  // 6,000 blocks: more than one run
  std::vector<hsm::GcmMessage> batch;
  for (size_t i = 0; i < messages.size(); ++i) batch.push_back({&ivs[i], &aads[i], messages[i].data(), messages[i].size()});
  hsm::BatchGate::Scope no_gate(nullptr);
  auto composed = composed_.aes_gcm_encrypt_batch(id, batch, no_gate);
  auto in_token = plain_.aes_gcm_encrypt_batch(id, batch, no_gate);  // composing off: message by message
  ASSERT_EQ(composed.size(), messages.size());
  ASSERT_EQ(in_token.size(), messages.size());
  for (size_t i = 0; i < messages.size(); ++i) {
    SCOPED_TRACE("message " + std::to_string(i));
    auto theirs = plain_.aes_gcm_encrypt(id, ivs[i], aads[i], messages[i].data(), messages[i].size());
    ASSERT_EQ(composed[i], theirs);
    ASSERT_EQ(in_token[i], theirs);
  }
  EXPECT_GE(pool_.streams_kept(), 1u);
}

// The batch assembly alone: one keystream for several messages (H once), and only for the
// messages it was made for.
TEST_F(ComposedGcmTest, ABatchKeystreamServesEachMessageItsOwnBlocks) {
  auto id = aes_key("p11kms/root/batch-assembly/v1");
  std::vector<hsm::Bytes> ivs = {pattern(12, 1), pattern(12, 2), pattern(12, 3)};
  std::vector<hsm::Bytes> aads = {{}, pattern(7, 4), {}};
  std::vector<hsm::Bytes> messages = {pattern(40, 5), pattern(0, 6), pattern(16, 7)};
  std::vector<hsm::GcmMessage> batch;
  for (size_t i = 0; i < 3; ++i) batch.push_back({&ivs[i], &aads[i], messages[i].data(), messages[i].size()});
  auto blocks = hsm::composed_gcm::counter_blocks(batch);
  ASSERT_EQ(blocks.size(), 16u * (1 + 4 + 1 + 2));  // H once, then J0 and the counters of each
  auto stream = plain_.aes_ecb_encrypt(id, blocks.data(), blocks.size());
  auto sealed = hsm::composed_gcm::seal(stream, batch);
  ASSERT_EQ(sealed.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_EQ(sealed[i], plain_.aes_gcm_encrypt(id, ivs[i], aads[i], messages[i].data(), messages[i].size()));

  // A keystream made for other messages than those sealed is never used.
  batch[1].data = messages[2].data();
  batch[1].len = messages[2].size();  // one block more than the keystream has
  EXPECT_THROW(hsm::composed_gcm::seal(stream, batch), hsm::composed_gcm::Mismatch);
  batch[1].len = 0;
  hsm::SecureBytes short_stream(stream.size() - 16);
  EXPECT_THROW(hsm::composed_gcm::seal(short_stream, batch), hsm::composed_gcm::Mismatch);
}

TEST_F(ComposedGcmTest, AlteredCiphertextTagAadOrIvIsRefused) {
  auto id = aes_key("p11kms/root/forged/v1");
  auto message = pattern(40, 9);
  hsm::Bytes aad = {'c', 't', 'x'};
  auto sealed = composed_.aes_gcm_encrypt(id, iv_, aad, message.data(), message.size());
  ASSERT_EQ(sealed.size(), message.size() + 16);
  for (size_t at : {size_t{0}, size_t{17}, message.size() - 1, message.size(), sealed.size() - 1}) {
    auto bad = sealed;
    bad[at] ^= 0x01;
    EXPECT_FALSE(composed_.aes_gcm_decrypt(id, iv_, aad, bad.data(), bad.size()).has_value()) << "byte " << at;
  }
  hsm::Bytes other_aad = {'c', 't', 'y'};
  EXPECT_FALSE(composed_.aes_gcm_decrypt(id, iv_, other_aad, sealed.data(), sealed.size()).has_value());
  auto other_iv = iv_;
  other_iv[11] ^= 0x80;
  EXPECT_FALSE(composed_.aes_gcm_decrypt(id, other_iv, aad, sealed.data(), sealed.size()).has_value());
  EXPECT_FALSE(composed_.aes_gcm_decrypt(id, iv_, aad, sealed.data(), 15).has_value());  // shorter than a tag
  auto truncated = hsm::Bytes(sealed.begin(), sealed.end() - 1);
  EXPECT_FALSE(composed_.aes_gcm_decrypt(id, iv_, aad, truncated.data(), truncated.size()).has_value());
  auto opened = composed_.aes_gcm_decrypt(id, iv_, aad, sealed.data(), sealed.size());
  ASSERT_TRUE(opened.has_value());  // and the untouched message still opens
  EXPECT_EQ(bytes(*opened), message);
}

// One session for everything: every key's stream and every other operation take turns on it,
// so each switch ends the kept AES-ECB operation or starts another.
TEST(ComposedGcmOneSession, KeysAndOtherOperationsTakeTurnsOnOneSession) {
  test_support::TempToken temp;
  hsm::SessionPool one(temp.pool_config(1));
  hsm::Token token(one, composing());
  hsm::Token plain(one);
  std::vector<hsm::ObjectId> keys;
  for (int i = 0; i < 3; ++i) {
    keys.push_back(token.new_object_id());
    token.generate_aes_key(keys.back(), 32, "p11kms/root/turns" + std::to_string(i) + "/v1");
  }
  auto mac_key = token.new_object_id();
  token.generate_hmac_key(mac_key, 32, "p11kms/audit/turns");
  hsm::Bytes aad;
  for (int round = 0; round < 20; ++round) {
    for (size_t k = 0; k < keys.size(); ++k) {
      auto message = pattern(32 + round, static_cast<uint8_t>(round * 3 + k));
      auto iv = pattern(12, static_cast<uint8_t>(round * 5 + k));
      auto sealed = token.aes_gcm_encrypt(keys[k], iv, aad, message.data(), message.size());
      // Only its own key opens it: no stream served another key's request.
      auto opened = plain.aes_gcm_decrypt(keys[k], iv, aad, sealed.data(), sealed.size());
      ASSERT_TRUE(opened.has_value()) << "round " << round << " key " << k;
      EXPECT_EQ(bytes(*opened), message);
      EXPECT_FALSE(plain.aes_gcm_decrypt(keys[(k + 1) % keys.size()], iv, aad, sealed.data(), sealed.size()).has_value());
      auto again = token.aes_gcm_decrypt(keys[k], iv, aad, sealed.data(), sealed.size());
      ASSERT_TRUE(again.has_value());
      EXPECT_EQ(bytes(*again), message);
      if (round % 2 == 0) {  // an operation of another kind on the same, only session
        auto mac = token.hmac_sha256(mac_key, message.data(), message.size());
        EXPECT_EQ(mac, plain.hmac_sha256(mac_key, message.data(), message.size()));
        EXPECT_EQ(one.streams_kept(), 0u);
      }
    }
  }
  EXPECT_EQ(one.streams_kept(), 1u);
}

// The pool's side of streams, on one session and a session AES key made here: a stream whose
// key was ended while a lease had it out (or was still starting it) never serves anyone else.
class StreamsOnOneSession : public ::testing::Test {
 protected:
  test_support::TempToken temp_;
  hsm::SessionPool pool_{temp_.pool_config(1)};
  CK_OBJECT_HANDLE key_ = 0;
  uint8_t blocks_[32] = {1, 2, 3};

  void SetUp() override {
    auto l = pool_.lease();
    hsm::AttributeTemplate t;
    t.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, CKK_AES).set_ulong(CKA_VALUE_LEN, 32)
        .set(CKA_TOKEN, false).set(CKA_ENCRYPT, true);
    CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
    l.check(l.fn()->C_GenerateKey(l.session(), &gen, t.data(), t.size(), &key_), "C_GenerateKey");
  }
  CK_RV start_ecb(hsm::SessionPool::Lease& l) {
    CK_MECHANISM ecb{CKM_AES_ECB, nullptr, 0};
    return l.fn()->C_EncryptInit(l.session(), &ecb, key_);
  }
  CK_RV update(hsm::SessionPool::Lease& l) {
    uint8_t out[sizeof blocks_];
    CK_ULONG n = sizeof out;
    return l.fn()->C_EncryptUpdate(l.session(), blocks_, sizeof blocks_, out, &n);
  }
};

TEST_F(StreamsOnOneSession, AStreamKeptAfterItsKeyWasEndedServesOnlyTheLeaseThatStartedIt) {
  {
    auto l = pool_.lease_stream("k");
    ASSERT_FALSE(l.stream_active());
    ASSERT_EQ(start_ecb(l), CKR_OK);
    pool_.end_streams("k");  // the key goes while this lease is starting its stream
    l.keep_stream("k");
    EXPECT_EQ(update(l), CKR_OK);  // the request in flight still completes
  }
  EXPECT_EQ(pool_.streams_kept(), 0u);
  auto next = pool_.lease_stream("k");
  EXPECT_FALSE(next.stream_active());
  EXPECT_EQ(start_ecb(next), CKR_OK) << "the ended stream was left active on the session";
}

TEST_F(StreamsOnOneSession, AStreamEndedWhileLeasedEndsWhenTheLeaseIsReleased) {
  {
    auto l = pool_.lease_stream("k");
    ASSERT_EQ(start_ecb(l), CKR_OK);
    l.keep_stream("k");
  }
  ASSERT_EQ(pool_.streams_kept(), 1u);
  {
    auto l = pool_.lease_stream("k");
    ASSERT_TRUE(l.stream_active());
    EXPECT_EQ(update(l), CKR_OK);
    pool_.end_streams("k");
  }
  EXPECT_EQ(pool_.streams_kept(), 0u);
  auto next = pool_.lease_stream("k");
  EXPECT_FALSE(next.stream_active());
  EXPECT_EQ(start_ecb(next), CKR_OK);
}

TEST_F(ComposedGcmTest, DestroyEndsTheKeysStreams) {
  auto id = aes_key("p11kms/root/ended/v1");
  auto message = pattern(32, 1);
  hsm::Bytes aad;
  composed_.aes_gcm_encrypt(id, iv_, aad, message.data(), message.size());
  ASSERT_EQ(pool_.streams_kept(), 1u);
  EXPECT_TRUE(composed_.destroy(id));
  EXPECT_EQ(pool_.streams_kept(), 0u);
  EXPECT_THROW(composed_.aes_gcm_encrypt(id, iv_, aad, message.data(), message.size()), hsm::ObjectMissing);
}

TEST_F(ComposedGcmTest, LongMessagesOtherIvsAndKeysWithoutAesEcbRunTheTokensGcm) {
  auto id = aes_key("p11kms/root/long/v1");
  hsm::Bytes aad;
  auto long_message = pattern(hsm::kComposedGcmMaxBytes + 1, 3);
  auto sealed = composed_.aes_gcm_encrypt(id, iv_, aad, long_message.data(), long_message.size());
  EXPECT_EQ(sealed, plain_.aes_gcm_encrypt(id, iv_, aad, long_message.data(), long_message.size()));
  auto iv16 = pattern(16, 8);
  auto message = pattern(32, 2);
  auto sealed16 = composed_.aes_gcm_encrypt(id, iv16, aad, message.data(), message.size());
  EXPECT_EQ(sealed16, plain_.aes_gcm_encrypt(id, iv16, aad, message.data(), message.size()));
  EXPECT_EQ(pool_.streams_kept(), 0u);

  // A key whose CKA_ALLOWED_MECHANISMS names only AES-GCM: the module refuses AES-ECB with it.
  auto gcm_only = composed_.new_object_id();
  {
    auto l = pool_.lease();
    CK_MECHANISM_TYPE allowed[] = {CKM_AES_GCM};
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE t[] = {{CKA_ID, gcm_only.data(), gcm_only.size()},
                        {CKA_TOKEN, &yes, sizeof yes},
                        {CKA_PRIVATE, &yes, sizeof yes},
                        {CKA_SENSITIVE, &yes, sizeof yes},
                        {CKA_EXTRACTABLE, &no, sizeof no},
                        {CKA_ENCRYPT, &yes, sizeof yes},
                        {CKA_DECRYPT, &yes, sizeof yes},
                        {CKA_VALUE_LEN, &len, sizeof len},
                        {CKA_ALLOWED_MECHANISMS, allowed, sizeof allowed}};
    CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE h = 0;
    l.check(l.fn()->C_GenerateKey(l.session(), &gen, t, sizeof t / sizeof t[0], &h), "C_GenerateKey");
  }
  for (int i = 0; i < 2; ++i) {  // the second time without asking the module again
    auto mine = composed_.aes_gcm_encrypt(gcm_only, iv_, aad, message.data(), message.size());
    EXPECT_EQ(mine, plain_.aes_gcm_encrypt(gcm_only, iv_, aad, message.data(), message.size()));
    auto opened = composed_.aes_gcm_decrypt(gcm_only, iv_, aad, mine.data(), mine.size());
    ASSERT_TRUE(opened.has_value());
    EXPECT_EQ(bytes(*opened), message);
  }
  EXPECT_EQ(pool_.streams_kept(), 0u);
}

// A re-opened module drops every session and with them the kept operations: the next message
// starts a stream again.
TEST_F(ComposedGcmTest, StreamsStartAgainAfterTheModuleIsReopened) {
  auto id = aes_key("p11kms/root/reopen/v1");
  auto message = pattern(32, 4);
  hsm::Bytes aad;
  auto before = composed_.aes_gcm_encrypt(id, iv_, aad, message.data(), message.size());
  ASSERT_EQ(pool_.streams_kept(), 1u);
  {
    auto l = pool_.lease();
    l.refresh_view();
  }
  EXPECT_EQ(pool_.streams_kept(), 0u);
  auto after = composed_.aes_gcm_encrypt(id, iv_, aad, message.data(), message.size());
  EXPECT_EQ(after, before);
  EXPECT_EQ(pool_.streams_kept(), 1u);
}

// A kept operation would go on working after the token went away (SoftHSM holds the key
// schedule in the session): like session copies, streams serve only while the token was seen
// present within the last second, and the service recovers when it is back.
TEST_F(ComposedGcmTest, ATokenThatIsGoneFailsComposedOperations) {
  auto id = aes_key("p11kms/root/outage/v1");
  auto message = pattern(32, 6);
  hsm::Bytes aad;
  auto sealed = composed_.aes_gcm_encrypt(id, iv_, aad, message.data(), message.size());
  ASSERT_EQ(pool_.streams_kept(), 1u);

  token_.take_away();
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // past the presence re-check
  EXPECT_THROW(composed_.aes_gcm_encrypt(id, iv_, aad, message.data(), message.size()), hsm::TokenUnavailable);
  EXPECT_THROW(composed_.aes_gcm_decrypt(id, iv_, aad, sealed.data(), sealed.size()), hsm::TokenUnavailable);
  token_.bring_back();

  std::optional<hsm::SecureBytes> opened;
  for (int i = 0; i < 50 && !opened; ++i) {
    try {
      opened = composed_.aes_gcm_decrypt(id, iv_, aad, sealed.data(), sealed.size());
    } catch (const hsm::TokenUnavailable&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ASSERT_TRUE(opened.has_value());
  EXPECT_EQ(bytes(*opened), message);
}

// The assembly on its own: a keystream that does not belong to the message is caught, never
// turned into output.
TEST(ComposedGcmAssembly, AKeystreamOfTheWrongSizeIsAMismatch) {
  hsm::Bytes iv(12, 1), aad;
  hsm::Bytes message(40, 2);
  hsm::SecureBytes short_stream(16 * 3);  // 40 bytes need 2 + 3 blocks
  EXPECT_THROW(hsm::composed_gcm::seal(short_stream, iv, aad, message.data(), message.size()), hsm::composed_gcm::Mismatch);
  auto blocks = hsm::composed_gcm::counter_blocks(iv, 40);
  ASSERT_EQ(blocks.size(), 16u * 5);
  EXPECT_EQ(hsm::Bytes(blocks.begin(), blocks.begin() + 16), hsm::Bytes(16, 0));  // the hash key's block
  EXPECT_EQ(blocks[16 + 15], 1);  // J0 = iv || 00000001
  EXPECT_EQ(blocks[16 * 4 + 15], 4);  // the third counter block
  EXPECT_EQ(hsm::Bytes(blocks.begin() + 16 * 4, blocks.begin() + 16 * 4 + 12), iv);
}

}  // namespace
