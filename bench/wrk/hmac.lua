-- transit hmac (sha2-256) of 32 bytes: POST /v1/transit/hmac/:key
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("POST", "/v1/transit/hmac/" .. c.env("P11KMS_BENCH_KEY"), '{"input":"' .. c.plaintext32 .. '"}')
done = c.report(1)
