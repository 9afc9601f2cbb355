// R, the token's own rate: each operation called directly through hsm/ (no HTTP, no store), on
// a throwaway SoftHSM token, with the object templates the service uses
// (hsm::Token::generate_aes_key). scripts/bench runs this and reads its JSON output.
//
//   token/*     what the service does per request, through hsm::Token as the server configures
//               it by default (app::token_options of a default config: session copies on,
//               and on SoftHSM AES-GCM composed from a kept AES-ECB operation; session lease,
//               handle and copy caches), 32-byte payloads, IVs from OpenSSL as keys/ draws them;
//               the signatures as keys/ makes them: HMAC-SHA-256 with a 64-byte token HMAC key,
//               ECDSA P-256 over a SHA-256 digest computed in the process (CKM_ECDSA), Ed25519
//               over the message (CKM_EDDSA), RSA-2048 PSS over a SHA-256 digest
//               (CKM_RSA_PKCS_PSS, Vault's default signature_algorithm).
//   analysis/*  AES-GCM encrypt in the token (CKM_AES_GCM, what the service runs with
//               hsm.compose_gcm false) as raw PKCS#11 calls, timed per call (counters
//               init_us = C_EncryptInit, op_us = C_Encrypt), on three AES-256 objects: the
//               service's token object (what it runs on with hsm.session_copies false), its
//               private session copy (C_CopyObject, what it runs on by default), and a
//               non-private session key (no p11kms key can be one: a copy cannot drop
//               CKA_PRIVATE).
//
// Every benchmark runs at 1 and 2 threads with real time, so items_per_second is the rate of
// the whole process. Nothing here asserts anything.
#include <benchmark/benchmark.h>
#include <openssl/sha.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <stdexcept>

#include "app/token_options.hpp"
#include "common/public_random.hpp"
#include "hsm/attributes.hpp"
#include "hsm/errors.hpp"
#include "hsm/session_pool.hpp"
#include "hsm/token.hpp"
#include "support/temp_token.hpp"

namespace {

using p11kms::hsm::Bytes;
using p11kms::hsm::ObjectId;
using p11kms::hsm::SessionPool;
using p11kms::hsm::Token;

constexpr size_t kPayload = 32;
constexpr size_t kSessions = 4;  // more than the most threads used, so no thread waits for a lease

struct Fixture {
  std::unique_ptr<p11kms::test_support::TempToken> temp;
  std::unique_ptr<SessionPool> pool;
  std::unique_ptr<Token> token;
  ObjectId key;
  ObjectId hmac_key, ecdsa_p256, ed25519, rsa2048;  // token objects made as keys/ makes them
  Bytes iv, sealed;
  CK_OBJECT_HANDLE token_handle = 0;           // the service's token object (it runs on a copy)
  CK_OBJECT_HANDLE session_private_copy = 0;   // C_CopyObject to CKA_TOKEN false (stays private)
  CK_OBJECT_HANDLE session_public_copy = 0;    // generated CKA_TOKEN false, CKA_PRIVATE false
};
Fixture* g = nullptr;

Bytes new_iv() {
  Bytes iv(12);
  p11kms::public_random::fill(iv.data(), iv.size());
  return iv;
}

const uint8_t kPlaintext[kPayload] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                      17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};

CK_OBJECT_HANDLE find_handle(SessionPool::Lease& l, const ObjectId& id) {
  p11kms::hsm::AttributeTemplate t;
  t.set_bytes(CKA_ID, id).set(CKA_TOKEN, true);
  l.check(l.fn()->C_FindObjectsInit(l.session(), t.data(), t.size()), "C_FindObjectsInit");
  CK_OBJECT_HANDLE h = 0;
  CK_ULONG n = 0;
  CK_RV rv = l.fn()->C_FindObjects(l.session(), &h, 1, &n);
  l.fn()->C_FindObjectsFinal(l.session());
  l.check(rv, "C_FindObjects");
  if (n != 1) throw std::runtime_error("benchmark key not found on the token");
  return h;
}

// The template of hsm::Token::generate_aes_key, with the booleans a copy scheme touches left as
// parameters (the service's key versions are token, private and, with copies, modifiable).
p11kms::hsm::AttributeTemplate aes_template(bool on_token, bool is_private, bool modifiable) {
  p11kms::hsm::AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_SECRET_KEY)
      .set_ulong(CKA_KEY_TYPE, CKK_AES)
      .set_ulong(CKA_VALUE_LEN, 32)
      .set(CKA_TOKEN, on_token)
      .set(CKA_PRIVATE, is_private)
      .set(CKA_SENSITIVE, true)
      .set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, modifiable)
      .set(CKA_ENCRYPT, true)
      .set(CKA_DECRYPT, true)
      .set(CKA_WRAP, false)
      .set(CKA_UNWRAP, false)
      .set(CKA_SIGN, false)
      .set(CKA_VERIFY, false)
      .set(CKA_DERIVE, false);
  return t;
}

CK_OBJECT_HANDLE generate(SessionPool::Lease& l, p11kms::hsm::AttributeTemplate t) {
  CK_MECHANISM mech{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE h = 0;
  l.check(l.fn()->C_GenerateKey(l.session(), &mech, t.data(), t.size(), &h), "C_GenerateKey");
  return h;
}

CK_RV session_copy(SessionPool::Lease& l, CK_OBJECT_HANDLE from, CK_OBJECT_HANDLE* to) {
  p11kms::hsm::AttributeTemplate t;
  t.set(CKA_TOKEN, false);
  return l.fn()->C_CopyObject(l.session(), from, t.data(), t.size(), to);
}

void setup() {
  g = new Fixture;
  g->temp = std::make_unique<p11kms::test_support::TempToken>("p11kms-bench");
  g->pool = std::make_unique<SessionPool>(g->temp->pool_config(kSessions));
  g->token = std::make_unique<Token>(*g->pool, p11kms::app::token_options(p11kms::app::Config::Hsm{}, *g->pool));
  g->key = g->token->new_object_id();
  g->token->generate_aes_key(g->key, 32, "p11kms/root/bench/v1");
  g->hmac_key = g->token->new_object_id();
  g->token->generate_hmac_key(g->hmac_key, 64, "p11kms/root/bench-hmac/v1");
  auto pair = [](p11kms::hsm::PairKind kind, int bits, const char* label) {
    ObjectId id = g->token->new_object_id();
    p11kms::hsm::PairSpec spec;
    spec.kind = kind;
    spec.rsa_bits = bits;
    g->token->generate_key_pair(spec, id, label);
    return id;
  };
  g->ecdsa_p256 = pair(p11kms::hsm::PairKind::ec_p256, 0, "p11kms/root/bench-ecdsa/v1");
  g->ed25519 = pair(p11kms::hsm::PairKind::ed25519, 0, "p11kms/root/bench-ed25519/v1");
  g->rsa2048 = pair(p11kms::hsm::PairKind::rsa, 2048, "p11kms/root/bench-rsa/v1");
  g->iv = new_iv();
  g->sealed = g->token->aes_gcm_encrypt(g->key, g->iv, {}, kPlaintext, kPayload);
  auto l = g->pool->lease();
  g->token_handle = find_handle(l, g->key);
  // The service's key version is made copyable (TokenOptions::session_copies), and its copy is
  // what token/* runs on; here the same copy as raw calls (SoftHSM never lets a copy drop
  // CKA_PRIVATE).
  l.check(session_copy(l, g->token_handle, &g->session_private_copy), "C_CopyObject");
  // A non-private session key, generated (a copy cannot make one): no CKA_VALUE decryption.
  g->session_public_copy = generate(l, aes_template(false, false, false));
}

void teardown() {
  if (!g) return;
  g->token.reset();
  g->pool.reset();  // closes the sessions: the session copies go with them
  g->temp.reset();
  delete g;
  g = nullptr;
}

// ---- token/*: the service's own path --------------------------------------------------------

void BM_Encrypt32(benchmark::State& state) {
  for (auto _ : state) {
    auto iv = new_iv();
    auto out = g->token->aes_gcm_encrypt(g->key, iv, {}, kPlaintext, kPayload);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_Decrypt32(benchmark::State& state) {
  for (auto _ : state) {
    auto out = g->token->aes_gcm_decrypt(g->key, g->iv, {}, g->sealed.data(), g->sealed.size());
    if (!out) {
      state.SkipWithError("decrypt failed");
      break;
    }
    benchmark::DoNotOptimize(out->data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_Random32(benchmark::State& state) {
  for (auto _ : state) {
    auto out = g->token->random(kPayload);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}

// What /transit/datakey/plaintext asks of the token: 32 random bytes, then an encrypt of them.
void BM_Datakey256(benchmark::State& state) {
  for (auto _ : state) {
    auto dk = g->token->random_secret(kPayload);
    auto iv = new_iv();
    auto out = g->token->aes_gcm_encrypt(g->key, iv, {}, dk.data(), dk.size());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}

Bytes sha256(const uint8_t* data, size_t len) {
  Bytes d(SHA256_DIGEST_LENGTH);
  SHA256(data, len, d.data());
  return d;
}

void BM_Hmac32(benchmark::State& state) {
  for (auto _ : state) {
    auto mac = g->token->hmac(g->hmac_key, CKM_SHA256_HMAC, kPlaintext, kPayload);
    benchmark::DoNotOptimize(mac.data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_SignEcdsaP256(benchmark::State& state) {
  for (auto _ : state) {
    auto digest = sha256(kPlaintext, kPayload);
    auto sig = g->token->sign(g->ecdsa_p256, CKM_ECDSA, nullptr, 0, digest.data(), digest.size());
    benchmark::DoNotOptimize(sig.data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_SignEd25519(benchmark::State& state) {
  for (auto _ : state) {
    auto sig = g->token->sign(g->ed25519, CKM_EDDSA, nullptr, 0, kPlaintext, kPayload);
    benchmark::DoNotOptimize(sig.data());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_SignRsa2048(benchmark::State& state) {
  for (auto _ : state) {
    auto digest = sha256(kPlaintext, kPayload);
    CK_RSA_PKCS_PSS_PARAMS params{CKM_SHA256, CKG_MGF1_SHA256, 222};  // salt "auto": the most that fits
    auto sig = g->token->sign(g->rsa2048, CKM_RSA_PKCS_PSS, &params, sizeof params, digest.data(), digest.size());
    benchmark::DoNotOptimize(sig.data());
  }
  state.SetItemsProcessed(state.iterations());
}

// ---- analysis/*: raw C_EncryptInit + C_Encrypt, each call timed ----------------------------

void raw_encrypt(benchmark::State& state, CK_OBJECT_HANDLE h) {
  using clock = std::chrono::steady_clock;
  double init_s = 0, op_s = 0;
  for (auto _ : state) {
    auto iv = new_iv();
    CK_GCM_PARAMS params{iv.data(), iv.size(), iv.size() * 8, nullptr, 0, 128};
    CK_MECHANISM mech{CKM_AES_GCM, &params, sizeof params};
    auto l = g->pool->lease();
    auto t0 = clock::now();
    CK_RV rv = l.fn()->C_EncryptInit(l.session(), &mech, h);
    auto t1 = clock::now();
    uint8_t out[kPayload + 16];
    CK_ULONG out_len = sizeof out;
    if (rv == CKR_OK) rv = l.fn()->C_Encrypt(l.session(), const_cast<uint8_t*>(kPlaintext), kPayload, out, &out_len);
    auto t2 = clock::now();
    if (rv != CKR_OK) {
      state.SkipWithError("C_EncryptInit/C_Encrypt failed");
      break;
    }
    init_s += std::chrono::duration<double>(t1 - t0).count();
    op_s += std::chrono::duration<double>(t2 - t1).count();
    benchmark::DoNotOptimize(out);
  }
  state.SetItemsProcessed(state.iterations());
  // Per call, in microseconds (averaged over this thread's iterations, then over threads).
  double n = static_cast<double>(state.iterations() > 0 ? state.iterations() : 1);
  state.counters["init_us"] = benchmark::Counter(init_s * 1e6 / n, benchmark::Counter::kAvgThreads);
  state.counters["op_us"] = benchmark::Counter(op_s * 1e6 / n, benchmark::Counter::kAvgThreads);
}

void BM_RawTokenObject(benchmark::State& state) { raw_encrypt(state, g->token_handle); }
void BM_RawSessionPrivateCopy(benchmark::State& state) { raw_encrypt(state, g->session_private_copy); }
void BM_RawSessionPublic(benchmark::State& state) { raw_encrypt(state, g->session_public_copy); }

void register_all() {
  auto reg = [](const char* name, void (*fn)(benchmark::State&)) {
    benchmark::RegisterBenchmark(name, fn)->Threads(1)->Threads(2)->UseRealTime();
  };
  reg("token/encrypt32", BM_Encrypt32);
  reg("token/decrypt32", BM_Decrypt32);
  reg("token/random32", BM_Random32);
  reg("token/datakey256", BM_Datakey256);
  reg("token/hmac32", BM_Hmac32);
  reg("token/sign_ecdsa_p256", BM_SignEcdsaP256);
  reg("token/sign_ed25519", BM_SignEd25519);
  reg("token/sign_rsa2048", BM_SignRsa2048);
  reg("analysis/encrypt32_token_object", BM_RawTokenObject);
  reg("analysis/encrypt32_session_private_copy", BM_RawSessionPrivateCopy);
  reg("analysis/encrypt32_session_public", BM_RawSessionPublic);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  try {
    setup();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "p11kms_token_bench: setup failed: %s\n", e.what());
    teardown();
    return 1;
  }
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  teardown();
  return 0;
}
