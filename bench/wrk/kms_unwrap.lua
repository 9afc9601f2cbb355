-- Key Protect unwrap of a wrapped 32-byte DEK: POST /kms/api/v2/keys/:id/actions/unwrap
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("POST", "/kms/api/v2/keys/" .. c.env("P11KMS_BENCH_KMS_KEY") .. "/actions/unwrap",
  '{"ciphertext":"' .. c.env("P11KMS_BENCH_KMS_CIPHERTEXT") .. '"}')
done = c.report(1)
