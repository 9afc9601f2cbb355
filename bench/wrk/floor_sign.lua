-- The floor plus one token signature (built only by scripts/bench): GET
-- /v1/sys/bench/floor-sign/:key answers as lookup-self does after signing 32 fixed bytes with
-- the key named by P11KMS_BENCH_SIGN_KEY as the token benchmark signs them for R.
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("GET", "/v1/sys/bench/floor-sign/" .. c.env("P11KMS_BENCH_SIGN_KEY"))
done = c.report(1)
