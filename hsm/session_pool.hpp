// A fixed pool of logged-in R/W sessions on one token, leased per operation by an RAII guard.
//
// One C_Login covers every session of the process, and closing the last session logs the
// process out, so the pool keeps its sessions open for the process's life. A connection-class
// failure (session/token/module gone) marks the pool disconnected: leases then fail fast with
// TokenUnavailable, and the next lease after the backoff re-initializes the module, finds the
// token by label again (slot ids change) and logs in, so the service recovers by itself.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "hsm/capabilities.hpp"
#include "hsm/errors.hpp"
#include "hsm/module.hpp"
#include "hsm/secret.hpp"

namespace p11kms::hsm {

struct PoolConfig {
  std::string module = "/usr/lib/softhsm/libsofthsm2.so";
  std::string token_label;
  SecretString user_pin;
  size_t sessions = 8;
};

struct PoolStatus {
  std::string token_label;
  bool reachable = false;
  size_t sessions_total = 0;
  size_t sessions_in_use = 0;
  std::string last_error;  // why the token is unreachable; empty when reachable
};

class SessionPool {
 public:
  // Loads the module and connects; throws (with a clear message) if that fails at start.
  explicit SessionPool(PoolConfig config);
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  class Lease {
   public:
    Lease(Lease&& o) noexcept;
    Lease& operator=(Lease&&) = delete;
    ~Lease();
    CK_FUNCTION_LIST* fn() const { return pool_->module_->fn(); }
    CK_SESSION_HANDLE session() const { return session_; }
    uint64_t generation() const { return generation_; }
    // Throws for rv != CKR_OK: TokenUnavailable (and the pool reconnects) for connection-class
    // failures, Pkcs11Error otherwise.
    void check(CK_RV rv, const char* function);
    // Throws TokenUnavailable (and the pool reconnects) unless the token still describes itself
    // (C_GetTokenInfo). A module can keep its sessions while its token is gone (SoftHSM whose
    // token directory vanished answers CKR_GENERAL_ERROR there and loses every object), so
    // "object missing" and health are only believed once the token is known to be there.
    void require_token_present();
    // The session may hold an operation the module left active (a call failed after its
    // C_*Init): it is closed and replaced on release instead of being reused.
    void discard() { discard_ = true; }
    // Re-opens the module so that it shows the token as it is now, then moves this lease to a
    // new session; every handle taken before is invalid afterwards. For an object another
    // process made that this one cannot find: SoftHSM 2.6.1 re-reads its token directory only
    // when the token's generation counter moved since it last looked, and a process that
    // commits an object of its own absorbs another's bump, so it may never see that object
    // until C_Initialize. Waits (bounded) for the other leases to come back; if they do not,
    // or another caller re-opened it meanwhile, returns with the view that is there.
    void refresh_view();
    // Whether the session still runs the AES-ECB encryption of the stream this lease was asked
    // for (SessionPool::lease_stream), started by an earlier lease: then C_EncryptUpdate works
    // at once. Otherwise the caller starts it and calls keep_stream.
    bool stream_active() const { return stream_active_; }
    // The session now runs `tag`'s AES-ECB encryption: it stays active when the lease ends, for
    // the next lease_stream(tag). A discarded session takes it with it.
    void keep_stream(const std::string& tag);

   private:
    friend class SessionPool;
    [[noreturn]] void lost(CK_RV rv, const char* function);
    Lease(SessionPool* pool, CK_SESSION_HANDLE s, uint64_t gen) : pool_(pool), session_(s), generation_(gen) {}
    SessionPool* pool_;
    CK_SESSION_HANDLE session_;
    uint64_t generation_;
    bool broken_ = false;
    bool discard_ = false;
    bool stream_active_ = false;
    uint64_t stream_epoch_ = 0;  // SessionPool::stream_epoch_ when taken
  };

  // Waits for a free session; throws TokenUnavailable while the token cannot be reached. The
  // session runs no operation: a stream it kept (lease_stream) is ended first, and sessions
  // that keep none are preferred.
  Lease lease();
  // A lease for keystream blocks of one key (Token's AES-GCM composed from AES-ECB, `tag` naming
  // the key): a free session that still runs that key's AES-ECB encryption if there is one
  // (Lease::stream_active), else one as lease() gives.
  Lease lease_stream(const std::string& tag);
  // Ends every kept stream whose tag starts with `prefix` (a key destroyed or its session object
  // replaced): at once on free sessions, on leased ones when their lease is released (also
  // streams being started by leases taken before this call). Never throws.
  void end_streams(const std::string& prefix);
  // How many sessions keep a stream now (tests, status).
  size_t streams_kept();

  // Asks the token whether it answers (one C_GetSessionInfo), reconnecting when due.
  PoolStatus probe();
  PoolStatus status();

  // Bumped on every reconnect: object handles from an older generation are invalid.
  uint64_t generation();
  // What the module can do: its mechanisms with their flags and the capability table derived
  // from them, read at connect and again after every reconnect (a different module or firmware
  // may answer). Never null.
  std::shared_ptr<const Capabilities> capabilities() const;
  const std::string& module_path() const { return module_->path(); }
  // CK_INFO manufacturerID of the module ("SoftHSM"), read when the pool was made.
  const std::string& library_manufacturer() const { return library_manufacturer_; }
  const std::string& token_label() const { return config_.token_label; }
  CK_SLOT_ID slot();

 private:
  void connect();  // module init, find token, open sessions, login; mu_ NOT held
  void release(CK_SESSION_HANDLE s, uint64_t gen, bool broken, bool discard);
  void mark_broken(uint64_t gen, const std::string& why);
  void try_reconnect(std::unique_lock<std::mutex>& lk);
  Lease take(const std::string* stream);
  // Under mu_: removes and returns the free session a lease should get (see take); `active`:
  // it runs `*stream`'s stream; `ending`: it kept another stream, to be ended before use.
  CK_SESSION_HANDLE pick_free(const std::string* stream, bool& active, bool& ending);
  // C_EncryptFinal of the lease's kept stream; on failure the session is discarded (replaced on
  // release) and false returned. Throws TokenUnavailable for a connection-class failure.
  bool end_stream(Lease& lease);
  CK_RV finish_stream(CK_SESSION_HANDLE s);  // C_EncryptFinal of the session's kept stream
  void refresh_view(Lease& lease);

  PoolConfig config_;
  std::unique_ptr<Module> module_;
  std::string library_manufacturer_;
  mutable std::mutex caps_mu_;
  std::shared_ptr<const Capabilities> capabilities_;  // guarded by caps_mu_

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<CK_SESSION_HANDLE> free_;
  std::vector<CK_SESSION_HANDLE> opened_;  // filled by connect()
  // Sessions that still run a key's AES-ECB encryption, by session; `ended` marks one to be
  // ended when its lease is released (its key went while the session was out). Cleared on
  // reconnect.
  struct KeptStream {
    std::string tag;
    bool ended = false;
  };
  std::unordered_map<CK_SESSION_HANDLE, KeptStream> streams_;
  // Bumped by end_streams: a stream started by a lease taken before it is kept as ended.
  uint64_t stream_epoch_ = 0;
  CK_SLOT_ID slot_ = 0;
  size_t in_use_ = 0;
  bool connected_ = false;
  bool reconnecting_ = false;
  bool refreshing_ = false;  // refresh_view(): new leases wait, the refresher drains the rest
  uint64_t generation_ = 0;
  std::string last_error_;
  std::chrono::steady_clock::time_point next_attempt_{};
  std::chrono::milliseconds backoff_{100};
};

}  // namespace p11kms::hsm
