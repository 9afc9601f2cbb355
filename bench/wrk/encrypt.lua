-- transit encrypt of 32 bytes: POST /v1/transit/encrypt/:key
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("POST", "/v1/transit/encrypt/" .. c.env("P11KMS_BENCH_KEY"), '{"plaintext":"' .. c.plaintext32 .. '"}')
done = c.report(1)
