-- transit batch encrypt, 100 items of 32 bytes each: POST /v1/transit/encrypt/:key
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("POST", "/v1/transit/encrypt/" .. c.env("P11KMS_BENCH_KEY"), c.batch_body(100))
done = c.report(100)
