-- Key Protect wrap of a given 32-byte DEK: POST /kms/api/v2/keys/:id/actions/wrap
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("POST", "/kms/api/v2/keys/" .. c.env("P11KMS_BENCH_KMS_KEY") .. "/actions/wrap",
  '{"plaintext":"' .. c.plaintext32 .. '"}')
done = c.report(1)
