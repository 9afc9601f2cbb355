-- Shared by the wrk scripts in this folder (loaded with dofile from each of them).
-- Environment, set by scripts/bench:
--   P11KMS_BENCH_TOKEN       the API token (X-Vault-Token)
--   P11KMS_BENCH_KEY         the transit key's name
--   P11KMS_BENCH_CIPHERTEXT  a vault:v1:... ciphertext of that key (decrypt only)
--   P11KMS_BENCH_SIGN_KEY    a transit signing key (sign.lua)
--   P11KMS_BENCH_KMS_KEY, P11KMS_BENCH_KMS_CIPHERTEXT  a Key Protect root key id and a
--                            ciphertext it wrapped (kms_wrap.lua, kms_unwrap.lua)
-- Each script sets wrk.method/path/body once: wrk then sends the same prebuilt request over
-- and over, so the client spends as little CPU as it can (it shares the machine with the
-- server). done() prints one machine-readable line that scripts/bench parses.
local M = {}

function M.env(name)
  local v = os.getenv(name)
  if v == nil or v == "" then
    error(name .. " is not set (run this through scripts/bench)")
  end
  return v
end

-- 32 bytes, base64: the payload of every single-item operation.
M.plaintext32 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

function M.request(method, path, body)
  wrk.method = method
  wrk.path = path
  wrk.headers["X-Vault-Token"] = M.env("P11KMS_BENCH_TOKEN")
  if body ~= nil then
    wrk.body = body
    wrk.headers["Content-Type"] = "application/json"
  end
end

function M.batch_body(n)
  local items = {}
  for i = 1, n do
    items[i] = '{"plaintext":"' .. M.plaintext32 .. '"}'
  end
  return '{"batch_input":[' .. table.concat(items, ",") .. ']}'
end

-- items: operations per request (batch size), so that items/s = requests/s * items.
function M.report(items)
  return function(summary, latency, requests)
    local secs = summary.duration / 1e6
    local e = summary.errors
    io.write(string.format(
      "WRK_RESULT requests=%d seconds=%.3f rps=%.2f items=%d p50_us=%.1f p99_us=%.1f " ..
      "max_us=%.1f status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
      summary.requests, secs, summary.requests / secs, items,
      latency:percentile(50), latency:percentile(99), latency.max,
      e.status, e.connect, e.read, e.write, e.timeout))
  end
end

return M
