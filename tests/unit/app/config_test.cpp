// Unit tests for app/config.hpp: YAML parsing, defaults, refusals naming the key, secret files.
#include "app/config.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "support/temp_token.hpp"

namespace app = p11kms::app;
namespace ts = p11kms::test_support;

namespace {

const std::string kHash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";  // sha256("test")
const std::string kBase = "/srv/p11kms";

const std::string kHsm = "hsm:\n  pin_file: /etc/p11kms/pin\n";
const std::string kAuth = "auth:\n  tokens:\n    - token_sha256: " + kHash + "\n";
const std::string kMinimal = kHsm + kAuth;

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Expects parse_config to throw ConfigError whose message contains `needle`; returns the message.
std::string expect_config_error(const std::string& yaml, const std::string& needle) {
  try {
    app::parse_config(yaml, kBase);
  } catch (const app::ConfigError& e) {
    EXPECT_TRUE(contains(e.what(), needle)) << "message \"" << e.what() << "\" does not name \"" << needle
                                            << "\"\nfor config:\n" << yaml;
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw something other than ConfigError: " << e.what() << "\nfor config:\n" << yaml;
    return {};
  }
  ADD_FAILURE() << "accepted config:\n" << yaml;
  return {};
}

std::string token_with(const std::string& extra_lines) {
  return kHsm + "auth:\n  tokens:\n    - token_sha256: " + kHash + "\n" + extra_lines;
}

// mTLS: what a certificate-bound token needs to be reachable.
const std::string kMtls = "listen:\n  tls:\n    cert_file: /c.pem\n    key_file: /k.pem\n    client_ca_file: /ca.pem\n";

}  // namespace

// ---- valid configs and defaults ----

TEST(ParseConfig, MinimalConfigGetsDefaults) {
  auto c = app::parse_config(kMinimal, kBase);
  EXPECT_EQ(c.listen_address, "127.0.0.1:8200");
  EXPECT_FALSE(c.http_handler_threads.has_value());  // absent: as many as listener threads
  EXPECT_EQ(c.hsm.sessions, 8u);
  EXPECT_TRUE(c.hsm.session_copies);
  EXPECT_EQ(c.hsm.module, "/usr/lib/softhsm/libsofthsm2.so");
  EXPECT_EQ(c.hsm.token_label, "p11kms");
  EXPECT_EQ(c.hsm.pin_file, "/etc/p11kms/pin");
  EXPECT_TRUE(c.hsm.pin_env.empty());
  EXPECT_EQ(c.store.driver, "sqlite");
  EXPECT_EQ(c.store.path, "/srv/p11kms/p11kms.db");
  EXPECT_EQ(c.limits.max_body_bytes, 1048576u);
  EXPECT_EQ(c.limits.max_json_depth, 64u);
  EXPECT_EQ(c.limits.max_batch_items, 1000u);
  ASSERT_EQ(c.tokens.size(), 1u);
  EXPECT_EQ(c.tokens[0].sha256, p11kms::policy::sha256_of("test"));
  EXPECT_EQ(c.tokens[0].name, "token-0");
  EXPECT_EQ(c.tokens[0].policies, std::vector<std::string>{"root"});
  EXPECT_EQ(c.tokens[0].namespaces, std::vector<std::string>{"root"});
  EXPECT_FALSE(c.tokens[0].expires.has_value());
}

TEST(ParseConfig, RelativePathsMadeAbsoluteAgainstBaseDir) {
  auto c = app::parse_config("hsm:\n  pin_file: secrets/pin\n  module: lib/mod.so\n"
                             "store:\n  path: data/keys.db\n" + kAuth,
                             kBase);
  EXPECT_EQ(c.hsm.pin_file, "/srv/p11kms/secrets/pin");
  EXPECT_EQ(c.hsm.module, "/srv/p11kms/lib/mod.so");
  EXPECT_EQ(c.store.path, "/srv/p11kms/data/keys.db");

  auto d = app::parse_config("hsm:\n  pin_file: ../pin\n" + kAuth, kBase);
  EXPECT_EQ(d.hsm.pin_file, "/srv/pin");
}

TEST(ParseConfig, AbsolutePathsKept) {
  auto c = app::parse_config("hsm:\n  pin_file: /run/pin\nstore:\n  path: /var/lib/p11kms/k.db\n" + kAuth, kBase);
  EXPECT_EQ(c.hsm.pin_file, "/run/pin");
  EXPECT_EQ(c.store.path, "/var/lib/p11kms/k.db");
}

TEST(ParseConfig, BareModuleNameLeftForTheLoader) {
  auto c = app::parse_config("hsm:\n  pin_file: /p\n  module: libsofthsm2.so\n" + kAuth, kBase);
  EXPECT_EQ(c.hsm.module, "libsofthsm2.so");
}

TEST(ParseConfig, FullValidConfig) {
  auto c = app::parse_config(
      "listen:\n  address: 0.0.0.0:9000\n  threads: 16\n  handler_threads: 0\n"
      "hsm:\n  module: /opt/hsm.so\n  token_label: prod\n  pin_env: HSM_PIN\n  sessions: 32\n"
      "store:\n  driver: sqlite\n  path: /data/p.db\n"
      "auth:\n  tokens:\n"
      "    - name: ci\n      token_sha256: " + kHash + "\n      policies: [root]\n      namespaces: [root, team-a]\n"
      "      expires: 2027-01-01T00:00:00Z\n"
      "    - name: ops\n      token_sha256: " + std::string(64, 'a') + "\n"
      "policies: {}\n"
      "limits:\n  max_body_bytes: 2048\n  max_json_depth: 10\n  max_batch_items: 5\n"
      "  max_header_bytes: 4096\n  max_key_name_length: 64\n  read_timeout_s: 5\n",
      kBase);
  EXPECT_EQ(c.listen_address, "0.0.0.0:9000");
  EXPECT_EQ(c.http_threads, 16u);
  EXPECT_EQ(c.http_handler_threads, std::optional<size_t>(0));  // 0 is allowed: no pool
  EXPECT_EQ(c.hsm.module, "/opt/hsm.so");
  EXPECT_EQ(c.hsm.token_label, "prod");
  EXPECT_EQ(c.hsm.pin_env, "HSM_PIN");
  EXPECT_TRUE(c.hsm.pin_file.empty());
  EXPECT_EQ(c.hsm.sessions, 32u);
  EXPECT_EQ(c.store.path, "/data/p.db");
  ASSERT_EQ(c.tokens.size(), 2u);
  EXPECT_EQ(c.tokens[0].name, "ci");
  EXPECT_EQ(c.tokens[0].namespaces, (std::vector<std::string>{"root", "team-a"}));
  EXPECT_EQ(c.tokens[1].name, "ops");
  EXPECT_EQ(c.limits.max_body_bytes, 2048u);
  EXPECT_EQ(c.limits.max_json_depth, 10u);
  EXPECT_EQ(c.limits.max_batch_items, 5u);
  EXPECT_EQ(c.limits.max_header_bytes, 4096u);
  EXPECT_EQ(c.max_key_name_length, 64u);
  EXPECT_EQ(c.read_timeout_s, 5);
}

// ---- unknown keys name the full dotted key ----

TEST(ParseConfig, UnknownTopLevelKey) {
  expect_config_error("listn:\n  address: 1.2.3.4:1\n" + kMinimal, "\"listn\"");
}

TEST(ParseConfig, UnknownKeyInSection) {
  expect_config_error("listen:\n  adress: 1.2.3.4:1\n" + kMinimal, "listen.adress");
  expect_config_error("hsm:\n  pin_file: /p\n  pinfile: /q\n" + kAuth, "hsm.pinfile");
  expect_config_error(kMinimal + "store:\n  pth: x.db\n", "store.pth");
  expect_config_error(kMinimal + "limits:\n  max_body: 2048\n", "limits.max_body");
  expect_config_error(kHsm + "auth:\n  token:\n    - token_sha256: " + kHash + "\n", "auth.token");
}

TEST(ParseConfig, UnknownKeyInsideAToken) {
  expect_config_error(token_with("      nme: ci\n"), "auth.tokens[0].nme");
  expect_config_error(kHsm + "auth:\n  tokens:\n    - token_sha256: " + kHash + "\n    - token_sha256: " + kHash +
                          "\n      polices: [root]\n",
                      "auth.tokens[1].polices");
}

// ---- features not in this release are refused naming the key ----

TEST(ParseConfig, UnavailableFeaturesRefusedNamingTheKey) {
  expect_config_error("listen:\n  tls:\n    cert_file: /c\n" + kMinimal, "listen.tls");
  expect_config_error(kMinimal + "store:\n  driver: postgres\n", "store.driver");
  expect_config_error(kMinimal + "store:\n  dsn: host=db\n", "store.dsn");
  expect_config_error(kMinimal + "store:\n  password_file: /pw\n", "store.password_file");
  expect_config_error(kMinimal + "audit:\n  file: /var/log/audit.log\n", "audit");
  expect_config_error(kMinimal + "limits:\n  rate_limit: 100\n", "limits.rate_limit");
  expect_config_error(kMinimal + "keyring:\n  enabled: true\n", "keyring");
  expect_config_error(kMinimal + "jwks:\n  enabled: true\n", "jwks");
  expect_config_error(kMinimal + "byok:\n  enabled: true\n", "byok");
  expect_config_error(token_with("      policies: [ops]\n"), "auth.tokens[0].policies");
  expect_config_error(token_with("      policies: [root, ops]\n"), "auth.tokens[0].policies");
}

// ---- mTLS: a client certificate's fingerprint bound to a token ----

TEST(ParseConfig, CertFingerprintAcceptedInHexAndColonFormsNormalised) {
  const std::string upper = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
  std::string colons;
  for (size_t i = 0; i < upper.size(); i += 2) colons += (i ? ":" : "") + upper.substr(i, 2);
  auto expected = p11kms::policy::parse_token_hash(kHash);
  ASSERT_TRUE(expected);
  for (const auto& form : {kHash, upper, colons, "\"" + colons + "\""}) {
    auto c = app::parse_config(kMtls + token_with("      cert_sha256: " + form + "\n"), kBase);
    ASSERT_TRUE(c.tokens.at(0).cert_sha256) << form;
    EXPECT_EQ(*c.tokens.at(0).cert_sha256, *expected) << form;
  }
  auto c = app::parse_config(kMinimal, kBase);
  EXPECT_FALSE(c.tokens.at(0).cert_sha256);
}

TEST(ParseConfig, MalformedCertFingerprintRefusedNamingTheField) {
  for (const std::string& bad : std::vector<std::string>{"abc", kHash.substr(2), kHash + "00", "zz" + kHash.substr(2), "sha256:" + kHash,
                                std::string(95, ':'), "9f-86" + kHash.substr(4)}) {
    auto msg = expect_config_error(token_with("      cert_sha256: \"" + bad + "\"\n"), "auth.tokens[0].cert_sha256");
    EXPECT_TRUE(contains(msg, "fingerprint")) << msg;
  }
  // one certificate, one token
  expect_config_error(kHsm + "auth:\n  tokens:\n    - {name: a, token_sha256: " + kHash + ", cert_sha256: " + kHash +
                          "}\n    - {name: b, token_sha256: " + kHash + ", cert_sha256: " + kHash + "}\n",
                      "auth.tokens[1].cert_sha256");
}

TEST(ParseConfig, CertFingerprintWithoutClientCaRefused) {
  auto msg = expect_config_error(token_with("      cert_sha256: " + kHash + "\n"), "auth.tokens[0].cert_sha256");
  EXPECT_TRUE(contains(msg, "client_ca_file")) << msg;
}

TEST(TokenAuthenticator, ClientCertificateAuthenticatesItsBoundTokenOnly) {
  using namespace p11kms::policy;
  TokenEntry bound;
  bound.name = "bound";
  bound.sha256 = sha256_of("secret-1");
  bound.cert_sha256 = parse_token_hash(kHash);
  TokenEntry plain;
  plain.name = "plain";
  plain.sha256 = sha256_of("secret-2");
  TokenEntry expired = bound;
  expired.name = "expired";
  expired.cert_sha256 = parse_token_hash(std::string(64, 'a'));
  expired.expires = 100;
  TokenAuthenticator auth({bound, plain, expired});
  auto* t = auth.authenticate_cert(kHash, 50);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->name, "bound");
  EXPECT_FALSE(auth.authenticate_cert(std::string(64, '0'), 50));
  EXPECT_FALSE(auth.authenticate_cert("", 50));  // no client certificate
  EXPECT_FALSE(auth.authenticate_cert("not hex", 50));
  ASSERT_TRUE(auth.authenticate_cert(std::string(64, 'a'), 50));
  EXPECT_FALSE(auth.authenticate_cert(std::string(64, 'a'), 100));  // expiry applies
  // a token entry without cert_sha256 is never reached by a certificate
  EXPECT_FALSE(auth.authenticate("secret-2", 50) == nullptr);
}

TEST(ParseConfig, PoliciesParsedAndTokensMayNameThem) {
  auto c = app::parse_config(token_with("      policies: [ops, kms-viewer]\n") +
                                 "policies:\n  ops:\n    - path: transit/encrypt/app-*\n"
                                 "      capabilities: [update, read]\n    - path: transit/keys/+\n"
                                 "      capabilities: [deny]\n",
                             kBase);
  ASSERT_EQ(c.policies.count("ops"), 1u);
  const auto& rules = c.policies.at("ops").rules;
  ASSERT_EQ(rules.size(), 2u);
  EXPECT_EQ(rules[0].path, "transit/encrypt/app-*");
  EXPECT_EQ(rules[0].capabilities, p11kms::policy::kUpdate | p11kms::policy::kRead);
  EXPECT_EQ(rules[1].capabilities, p11kms::policy::kDeny);
  EXPECT_EQ(c.tokens.at(0).policies, (std::vector<std::string>{"ops", "kms-viewer"}));
  expect_config_error(kMinimal + "policies:\n  p:\n    - path: a*b\n      capabilities: [read]\n",
                      "policies.p[0].path");
}

TEST(ParseConfig, EmptyPoliciesMappingAccepted) {
  EXPECT_NO_THROW(app::parse_config(kMinimal + "policies: {}\n", kBase));
}

TEST(ParseConfig, UnknownStoreDriverRefused) {
  expect_config_error(kMinimal + "store:\n  driver: mysql\n", "store.driver");
}

// ---- required values ----

TEST(ParseConfig, PinSourceRequired) {
  auto msg = expect_config_error(kAuth, "hsm");
  EXPECT_TRUE(contains(msg, "pin_file")) << msg;
  expect_config_error("hsm:\n  module: /x.so\n" + kAuth, "pin_file");
}

TEST(ParseConfig, EmptyPinFileRefused) {
  expect_config_error("hsm:\n  pin_file: \"\"\n" + kAuth, "pin_file");
}

TEST(ParseConfig, PinFileAndPinEnvBothSetRefused) {
  expect_config_error("hsm:\n  pin_file: /p\n  pin_env: PIN\n" + kAuth, "pin_env");
}

TEST(ParseConfig, PinEnvAloneAccepted) {
  auto c = app::parse_config("hsm:\n  pin_env: HSM_PIN\n" + kAuth, kBase);
  EXPECT_EQ(c.hsm.pin_env, "HSM_PIN");
}

TEST(ParseConfig, TokenHashRequired) {
  expect_config_error(kHsm + "auth:\n  tokens:\n    - name: ci\n", "auth.tokens[0].token_sha256");
}

TEST(ParseConfig, TokenHashMustBe64Hex) {
  expect_config_error(kHsm + "auth:\n  tokens:\n    - token_sha256: " + kHash.substr(0, 62) + "\n",
                      "auth.tokens[0].token_sha256");
  expect_config_error(kHsm + "auth:\n  tokens:\n    - token_sha256: " + kHash + "00\n",
                      "auth.tokens[0].token_sha256");
  std::string bad = kHash;
  bad[0] = 'z';
  expect_config_error(kHsm + "auth:\n  tokens:\n    - token_sha256: " + bad + "\n", "auth.tokens[0].token_sha256");
  expect_config_error(kHsm + "auth:\n  tokens:\n    - token_sha256: test\n", "auth.tokens[0].token_sha256");
}

TEST(ParseConfig, AtLeastOneTokenRequired) {
  expect_config_error(kHsm, "auth.tokens");
  expect_config_error(kHsm + "auth:\n  tokens: []\n", "auth.tokens");
}

TEST(ParseConfig, MalformedStructureRefused) {
  expect_config_error(kHsm + "auth:\n  tokens: " + kHash + "\n", "auth.tokens");
  expect_config_error(kHsm + "auth:\n  tokens:\n    - " + kHash + "\n", "auth.tokens[0]");
  expect_config_error("- a\n- b\n", "top level");
  expect_config_error("hsm: [\n", "invalid YAML");
  expect_config_error("hsm:\n  pin_file: [a, b]\n" + kAuth, "hsm.pin_file");
  expect_config_error("listen:\n  address: localhost\n" + kMinimal, "listen.address");
}

// ---- expires ----

TEST(ParseConfig, ExpiresParsedAsUtc) {
  auto c = app::parse_config(token_with("      expires: 2027-01-01T00:00:00Z\n"), kBase);
  ASSERT_TRUE(c.tokens[0].expires.has_value());
  EXPECT_EQ(*c.tokens[0].expires, 1798761600);
  c = app::parse_config(token_with("      expires: \"2030-06-15T12:34:56Z\"\n"), kBase);
  EXPECT_EQ(*c.tokens[0].expires, 1907757296);
  c = app::parse_config(token_with("      expires: 2038-01-19T03:14:08Z\n"), kBase);  // past 32-bit time_t
  EXPECT_EQ(*c.tokens[0].expires, 2147483648LL);
}

TEST(ParseConfig, ExpiresWithOffsetIsConvertedToUtc) {
  auto c = app::parse_config(token_with("      expires: 2027-01-01T00:00:00+02:00\n"), "/srv/p11kms");
  ASSERT_TRUE(c.tokens.at(0).expires.has_value());
  EXPECT_EQ(*c.tokens.at(0).expires, 1798761600 - 2 * 3600);
  expect_config_error(token_with("      expires: 2027-02-30T00:00:00Z\n"), "auth.tokens[0].expires");
}

TEST(ParseConfig, ExpiresMalformedRefused) {
  expect_config_error(token_with("      expires: tomorrow\n"), "auth.tokens[0].expires");
  expect_config_error(token_with("      expires: 2027-01-01T00:00:00Zjunk\n"), "auth.tokens[0].expires");
  expect_config_error(token_with("      expires: 1798761600\n"), "auth.tokens[0].expires");
}

TEST(ParseConfig, ExpiresTruncatedRefused) {
  expect_config_error(token_with("      expires: 2027-01-01\n"), "auth.tokens[0].expires");
  expect_config_error(token_with("      expires: 2027-01-01T12\n"), "auth.tokens[0].expires");
  expect_config_error(token_with("      expires: \"2027\"\n"), "auth.tokens[0].expires");
}

// The refusal message says "must be a UTC time ending in Z".
TEST(ParseConfig, ExpiresMustEndInZ) {
  expect_config_error(token_with("      expires: 2027-01-01T00:00:00\n"), "auth.tokens[0].expires");
  expect_config_error(token_with("      expires: 2027-01-01T00:00:00Z junk\n"), "auth.tokens[0].expires");
}

// ---- integers and ranges ----

TEST(ParseConfig, SessionCopiesIsABoolean) {
  EXPECT_FALSE(app::parse_config("hsm:\n  pin_file: /p\n  session_copies: false\n" + kAuth, kBase).hsm.session_copies);
  EXPECT_TRUE(app::parse_config("hsm:\n  pin_file: /p\n  session_copies: true\n" + kAuth, kBase).hsm.session_copies);
  expect_config_error("hsm:\n  pin_file: /p\n  session_copies: yes please\n" + kAuth, "hsm.session_copies");
  expect_config_error("hsm:\n  pin_file: /p\n  session_copies: [true]\n" + kAuth, "hsm.session_copies");
}

TEST(ParseConfig, SerializeBatchesIsAutoOrABoolean) {
  auto parsed = [](const std::string& v) {
    return app::parse_config("hsm:\n  pin_file: /p\n  serialize_batches: " + v + "\n" + kAuth, kBase).hsm.serialize_batches;
  };
  EXPECT_FALSE(app::parse_config("hsm:\n  pin_file: /p\n" + kAuth, kBase).hsm.serialize_batches.has_value());
  EXPECT_FALSE(parsed("auto").has_value());
  EXPECT_EQ(parsed("true"), std::optional<bool>(true));
  EXPECT_EQ(parsed("false"), std::optional<bool>(false));
  expect_config_error("hsm:\n  pin_file: /p\n  serialize_batches: sometimes\n" + kAuth, "hsm.serialize_batches");
  expect_config_error("hsm:\n  pin_file: /p\n  serialize_batches: [auto]\n" + kAuth, "hsm.serialize_batches");
}

TEST(ParseConfig, ComposeGcmIsAutoOrABoolean) {
  auto parsed = [](const std::string& v) {
    return app::parse_config("hsm:\n  pin_file: /p\n  compose_gcm: " + v + "\n" + kAuth, kBase).hsm.compose_gcm;
  };
  EXPECT_FALSE(app::parse_config("hsm:\n  pin_file: /p\n" + kAuth, kBase).hsm.compose_gcm.has_value());
  EXPECT_FALSE(parsed("auto").has_value());
  EXPECT_EQ(parsed("true"), std::optional<bool>(true));
  EXPECT_EQ(parsed("false"), std::optional<bool>(false));
  expect_config_error("hsm:\n  pin_file: /p\n  compose_gcm: maybe\n" + kAuth, "hsm.compose_gcm");
  expect_config_error("hsm:\n  pin_file: /p\n  compose_gcm: {on: true}\n" + kAuth, "hsm.compose_gcm");
}

TEST(ParseConfig, BadIntegersRefusedNamingTheKey) {
  expect_config_error("hsm:\n  pin_file: /p\n  sessions: eight\n" + kAuth, "hsm.sessions");
  expect_config_error("hsm:\n  pin_file: /p\n  sessions: 8.5\n" + kAuth, "hsm.sessions");
  expect_config_error("hsm:\n  pin_file: /p\n  sessions: 8x\n" + kAuth, "hsm.sessions");
  expect_config_error("hsm:\n  pin_file: /p\n  sessions: \"\"\n" + kAuth, "hsm.sessions");
  expect_config_error("hsm:\n  pin_file: /p\n  sessions: [8]\n" + kAuth, "hsm.sessions");
  expect_config_error(kMinimal + "limits:\n  max_body_bytes: 99999999999999999999999\n", "limits.max_body_bytes");
  expect_config_error(kMinimal + "limits:\n  max_json_depth: deep\n", "limits.max_json_depth");
  expect_config_error("listen:\n  threads: many\n" + kMinimal, "listen.threads");
}

TEST(ParseConfig, OutOfRangeLimitsRefusedNamingTheKey) {
  expect_config_error("hsm:\n  pin_file: /p\n  sessions: 0\n" + kAuth, "hsm.sessions");
  expect_config_error("hsm:\n  pin_file: /p\n  sessions: -1\n" + kAuth, "hsm.sessions");
  expect_config_error("hsm:\n  pin_file: /p\n  sessions: 1025\n" + kAuth, "hsm.sessions");
  expect_config_error(kMinimal + "limits:\n  max_body_bytes: 1023\n", "limits.max_body_bytes");
  expect_config_error(kMinimal + "limits:\n  max_body_bytes: -5\n", "limits.max_body_bytes");
  expect_config_error(kMinimal + "limits:\n  max_json_depth: 1\n", "limits.max_json_depth");
  expect_config_error(kMinimal + "limits:\n  max_json_depth: 1001\n", "limits.max_json_depth");
  expect_config_error(kMinimal + "limits:\n  max_batch_items: 0\n", "limits.max_batch_items");
  expect_config_error(kMinimal + "limits:\n  max_header_bytes: 100\n", "limits.max_header_bytes");
  expect_config_error(kMinimal + "limits:\n  max_key_name_length: 0\n", "limits.max_key_name_length");
  expect_config_error(kMinimal + "limits:\n  read_timeout_s: 0\n", "limits.read_timeout_s");
  expect_config_error("listen:\n  threads: 1\n" + kMinimal, "listen.threads");
  expect_config_error("listen:\n  handler_threads: -1\n" + kMinimal, "listen.handler_threads");
  expect_config_error("listen:\n  handler_threads: 1025\n" + kMinimal, "listen.handler_threads");
}

TEST(ParseConfig, RangeBoundsAccepted) {
  auto c = app::parse_config("hsm:\n  pin_file: /p\n  sessions: 1\n" + kAuth +
                                 "limits:\n  max_body_bytes: 1024\n  max_json_depth: 1000\n",
                             kBase);
  EXPECT_EQ(c.hsm.sessions, 1u);
  EXPECT_EQ(c.limits.max_body_bytes, 1024u);
  EXPECT_EQ(c.limits.max_json_depth, 1000u);
}

// ---- files ----

namespace {

class TempDir {
 public:
  TempDir() : dir_(ts::make_temp_dir("p11kms-config-test")) {}
  ~TempDir() { ts::remove_tree(dir_); }
  const std::string& path() const { return dir_; }
  std::string write(const std::string& name, const std::string& content) const {
    std::string p = dir_ + "/" + name;
    std::ofstream out(p, std::ios::binary);
    out << content;
    return p;
  }

 private:
  std::string dir_;
};

}  // namespace

TEST(ReadSecretFile, StripsExactlyOneTrailingNewline) {
  TempDir d;
  EXPECT_EQ(app::read_secret_file(d.write("a", "1234\n")).reveal(), "1234");
  EXPECT_EQ(app::read_secret_file(d.write("b", "1234")).reveal(), "1234");
  EXPECT_EQ(app::read_secret_file(d.write("c", "1234\n\n")).reveal(), "1234\n");
  EXPECT_EQ(app::read_secret_file(d.write("d", "\n")).reveal(), "");
  EXPECT_EQ(app::read_secret_file(d.write("e", "")).reveal(), "");
  EXPECT_EQ(app::read_secret_file(d.write("f", " 12 34 \n")).reveal(), " 12 34 ");
  EXPECT_EQ(app::read_secret_file(d.write("g", "1234\r\n")).reveal(), "1234");  // one CRLF newline
}

TEST(ReadSecretFile, MissingFileIsConfigError) {
  TempDir d;
  EXPECT_THROW(app::read_secret_file(d.path() + "/absent"), app::ConfigError);
}

TEST(ReadPin, FromFileAndEnv) {
  TempDir d;
  app::Config::Hsm h;
  h.pin_file = d.write("pin", "9876\n");
  EXPECT_EQ(app::read_pin(h).reveal(), "9876");

  h.pin_file = d.write("empty", "\n");
  EXPECT_THROW(app::read_pin(h), app::ConfigError);

  app::Config::Hsm e;
  e.pin_env = "P11KMS_UNIT_TEST_PIN_VAR";
  ::unsetenv(e.pin_env.c_str());
  EXPECT_THROW(app::read_pin(e), app::ConfigError);
  ::setenv(e.pin_env.c_str(), "4321", 1);
  EXPECT_EQ(app::read_pin(e).reveal(), "4321");
  ::unsetenv(e.pin_env.c_str());
}

TEST(LoadConfigFile, BaseDirIsTheFilesDirectory) {
  TempDir d;
  std::string path = d.write("p11kms.yaml", "hsm:\n  pin_file: pin\n" + kAuth);
  auto c = app::load_config_file(path);
  EXPECT_EQ(c.hsm.pin_file, d.path() + "/pin");
  EXPECT_EQ(c.store.path, d.path() + "/p11kms.db");
  EXPECT_THROW(app::load_config_file(d.path() + "/absent.yaml"), app::ConfigError);
}

// ---- byok: the BYOK key registry ----

TEST(ParseConfig, ByokDefaults) {
  auto c = app::parse_config(kMinimal, kBase);
  EXPECT_EQ(c.byok.region, "local");
  EXPECT_EQ(c.byok.validation_interval_s, 300);
  EXPECT_EQ(c.byok.in_use_window_s, 86400);
  EXPECT_EQ(c.byok.max_keys, 1000u);
}

TEST(ParseConfig, ByokSectionParsedWithDurations) {
  auto c = app::parse_config(kMinimal + "byok:\n  region: eu-west-1\n  validation_interval: 30s\n"
                                        "  in_use_window: 2h\n  max_keys: 250\n",
                             kBase);
  EXPECT_EQ(c.byok.region, "eu-west-1");
  EXPECT_EQ(c.byok.validation_interval_s, 30);
  EXPECT_EQ(c.byok.in_use_window_s, 7200);
  EXPECT_EQ(c.byok.max_keys, 250u);
  auto d = app::parse_config(kMinimal + "byok:\n  validation_interval: 5m\n  in_use_window: 90\n", kBase);
  EXPECT_EQ(d.byok.validation_interval_s, 300);
  EXPECT_EQ(d.byok.in_use_window_s, 90);
  EXPECT_EQ(d.byok.region, "local");
}

TEST(ParseConfig, ByokBadValuesRefusedNamingTheKey) {
  expect_config_error(kMinimal + "byok:\n  validation_interval: soon\n", "byok.validation_interval");
  expect_config_error(kMinimal + "byok:\n  validation_interval: 0s\n", "byok.validation_interval");
  expect_config_error(kMinimal + "byok:\n  in_use_window: 5d\n", "byok.in_use_window");
  expect_config_error(kMinimal + "byok:\n  max_keys: 0\n", "byok.max_keys");
  expect_config_error(kMinimal + "byok:\n  region: \"us west\"\n", "byok.region");
  expect_config_error(kMinimal + "byok:\n  regions: x\n", "byok.regions");
}

// ---- keyring: cluster (default) and vault strategies ----

namespace {
const std::string kVault = "keyring:\n  strategy: vault\n  vault:\n    address: https://vault.example:8200/\n"
                           "    path: kong/keyring\n    token_file: vault.token\n";
}  // namespace

TEST(ParseConfig, KeyringDefaultsToCluster) {
  auto c = app::parse_config(kMinimal, kBase);
  EXPECT_EQ(c.keyring.strategy, "cluster");
  EXPECT_TRUE(c.keyring.vault.address.empty());
}

TEST(ParseConfig, KeyringVaultParsed) {
  auto c = app::parse_config(kMinimal + kVault + "    ca_file: ca/vault.pem\n", kBase);
  EXPECT_EQ(c.keyring.strategy, "vault");
  EXPECT_EQ(c.keyring.vault.address, "https://vault.example:8200");
  EXPECT_EQ(c.keyring.vault.mount, "secret");
  EXPECT_EQ(c.keyring.vault.path, "kong/keyring");
  EXPECT_EQ(c.keyring.vault.token_file, "/srv/p11kms/vault.token");
  EXPECT_EQ(c.keyring.vault.ca_file, "/srv/p11kms/ca/vault.pem");
  auto d = app::parse_config(kMinimal + "keyring:\n  strategy: vault\n  vault: {address: 'http://127.0.0.1:8201', "
                                        "mount: /kv2/, path: keyring, token_file: /run/vault.token}\n",
                             kBase);
  EXPECT_EQ(d.keyring.vault.address, "http://127.0.0.1:8201");
  EXPECT_EQ(d.keyring.vault.mount, "kv2");
  EXPECT_EQ(d.keyring.vault.token_file, "/run/vault.token");
  EXPECT_TRUE(d.keyring.vault.ca_file.empty());
}

TEST(ParseConfig, KeyringVaultRefusalsNameTheField) {
  const std::string head = kMinimal + "keyring:\n  strategy: vault\n  vault:\n";
  expect_config_error(kMinimal + "keyring:\n  strategy: vault\n", "keyring.vault");
  expect_config_error(kMinimal + "keyring:\n  strategy: other\n", "keyring.strategy");
  expect_config_error(kMinimal + "keyring:\n  vault: {address: 'https://v:8200', path: k, token_file: t}\n",
                      "keyring.vault");  // strategy is cluster
  expect_config_error(head + "    path: k\n    token_file: t\n", "keyring.vault.address");
  expect_config_error(head + "    address: vault:8200\n    path: k\n    token_file: t\n", "keyring.vault.address");
  expect_config_error(head + "    address: ftp://vault\n    path: k\n    token_file: t\n", "keyring.vault.address");
  expect_config_error(head + "    address: https://vault:8200/v1\n    path: k\n    token_file: t\n",
                      "keyring.vault.address");
  expect_config_error(head + "    address: https://v:8200\n    token_file: t\n", "keyring.vault.path");
  expect_config_error(head + "    address: https://v:8200\n    path: 'a/../b'\n    token_file: t\n",
                      "keyring.vault.path");
  expect_config_error(head + "    address: https://v:8200\n    path: 'a?version=1'\n    token_file: t\n",
                      "keyring.vault.path");
  expect_config_error(head + "    address: https://v:8200\n    path: k\n    mount: ''\n    token_file: t\n",
                      "keyring.vault.mount");
  expect_config_error(head + "    address: https://v:8200\n    path: k\n", "keyring.vault.token_file");
  expect_config_error(head + "    address: http://v:8200\n    path: k\n    token_file: t\n    ca_file: ca.pem\n",
                      "keyring.vault.ca_file");
  expect_config_error(head + "    address: https://v:8200\n    path: k\n    token_file: t\n    token: s.abc\n",
                      "keyring.vault.token");
}

// ---- audit: one chain (and head) per instance ----

TEST(ParseConfig, AuditChainDefaultsToHostAndPathAndCanBeNamed) {
  auto c = app::parse_config(kMinimal + "audit:\n  path: /var/log/p11kms/audit.log\n", kBase);
  const std::string suffix = ":/var/log/p11kms/audit.log";
  ASSERT_GT(c.audit.chain.size(), suffix.size());
  EXPECT_EQ(c.audit.chain.substr(c.audit.chain.size() - suffix.size()), suffix);
  c = app::parse_config(kMinimal + "audit:\n  path: /var/log/a.log\n  chain: host-a\n", kBase);
  EXPECT_EQ(c.audit.chain, "host-a");
  expect_config_error(kMinimal + "audit:\n  path: /a.log\n  chain: \"two words\"\n", "audit.chain");
}
