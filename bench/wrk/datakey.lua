-- transit data key, 256 bits, plaintext and ciphertext: POST /v1/transit/datakey/plaintext/:key
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("POST", "/v1/transit/datakey/plaintext/" .. c.env("P11KMS_BENCH_KEY"), '{"bits":256}')
done = c.report(1)
