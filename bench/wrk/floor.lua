-- F, the HTTP floor: an authenticated route that does no crypto, GET /v1/auth/token/lookup-self
local c = dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
c.request("GET", "/v1/auth/token/lookup-self")
done = c.report(1)
