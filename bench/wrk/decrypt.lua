-- transit decrypt of a 32-byte ciphertext: POST /v1/transit/decrypt/:key
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("POST", "/v1/transit/decrypt/" .. c.env("P11KMS_BENCH_KEY"),
  '{"ciphertext":"' .. c.env("P11KMS_BENCH_CIPHERTEXT") .. '"}')
done = c.report(1)
