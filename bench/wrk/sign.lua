-- transit sign of 32 bytes (the key's defaults: sha2-256; RSA-PSS for rsa keys):
-- POST /v1/transit/sign/:key, the key named by P11KMS_BENCH_SIGN_KEY
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("POST", "/v1/transit/sign/" .. c.env("P11KMS_BENCH_SIGN_KEY"), '{"input":"' .. c.plaintext32 .. '"}')
done = c.report(1)
